"""`load_tokenizer` on the three on-disk forms, against transformers' AutoTokenizer and sentencepiece itself.

Special-token ids are checked at their real offsets from the vocabulary end (model-facts §4: e.g.
InternVL2-1B `<img>` = 151646 = 151655 − 9). Random strings use a seed drawn per run (in messages).
"""

from __future__ import annotations

import random
import shutil
import unicodedata
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as RawTokenizer
from transformers import AutoTokenizer

from vlmbuild.errors import CheckpointError
from vlmbuild.recipe import load_recipe
from vlmbuild.synth import synth_checkpoint
from vlmbuild.tokenizer import load_tokenizer

RECIPES = {"qwen2": "tiny-internvl2-1b", "internlm2": "internvl2-2b", "phi3": "internvl2-4b", "qwen": "qwen-vl-chat"}
IVL = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
# token → id − vocab_size in the real tokenizers (model-facts §4).
OFFSETS = {
    "qwen2": {"<|endoftext|>": -12, "<|im_start|>": -11, "<|im_end|>": -10} | {t: k - 9 for k, t in enumerate(IVL)},
    "internlm2": {"<|im_end|>": -11, "<|im_start|>": -10} | {t: k - 9 for k, t in enumerate(IVL)},
    "phi3": {"<|endoftext|>": -20, "<|assistant|>": -19, "<|system|>": -14, "<|end|>": -13, "<|user|>": -10}
    | {t: k - 9 for k, t in enumerate(IVL)},
    # Qwen-VL: 151643.. <|endoftext|> <|im_start|> <|im_end|>, 205 extras, then <ref> … <img> </img> <imgpad> (151860 = len)
    "qwen": {"<|endoftext|>": -217, "<|im_start|>": -216, "<|im_end|>": -215, "<|extra_0|>": -214, "<|extra_204|>": -10,
             "<ref>": -9, "<quad>": -5, "<img>": -3, "</img>": -2, "<imgpad>": -1},
}
FIXED = {"internlm2": {"<unk>": 0, "<s>": 1, "</s>": 2}, "phi3": {"<unk>": 0, "<s>": 1, "</s>": 2}, "qwen2": {}, "qwen": {}}
EOS = {"qwen2": "<|im_end|>", "internlm2": "</s>", "phi3": "<|endoftext|>", "qwen": "<|endoftext|>"}
BOS = {"qwen2": [], "internlm2": [1], "phi3": [1], "qwen": []}
SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
WORDS = ["hello", "world", " the", "图片", "描述", "猫", "123", "4.5", "\n", "  ", " ", "!", "?", "InternVL", "e\u0301", "🙂", "Ωmega"]
CHAT = {
    "qwen2": f"<|im_start|>system\n{SYSTEM}<|im_end|><|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\n描述这张图片 please<|im_end|><|im_start|>assistant\n",
    "internlm2": f"<|im_start|>system\n{SYSTEM}<|im_end|><|im_start|>user\n<img><IMG_CONTEXT></img>\nHi 你好<|im_end|><|im_start|>assistant\n",
    "phi3": f"<|system|>\n{SYSTEM}<|end|><|user|>\n<img><IMG_CONTEXT></img>\nWhat is this? 这是什么<|end|><|assistant|>\n",
    "qwen": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPicture 1: <img><imgpad><imgpad></img>\n"
            "这是什么<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    return {fam: synth_checkpoint(load_recipe(r), tmp_path_factory.mktemp(fam) / "hf") for fam, r in RECIPES.items()}


def random_texts(seed: int, n: int = 20, lead_space: bool = True) -> list[str]:
    """Random mixes of WORDS; `lead_space=False` for comparisons with transformers' Llama tokenizer, whose
    Metaspace pre-tokenizer skips the dummy "▁" when a text already starts with a space (sentencepiece does not)."""
    rng = random.Random(seed)
    texts = ["".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]
    return texts if lead_space else [t.lstrip() or "x" for t in texts]


@pytest.mark.parametrize("fam", RECIPES)
def test_special_tokens_ids_and_bos(dirs, fam):
    tok = load_tokenizer(dirs[fam])
    want = {t: tok.vocab_size + off for t, off in OFFSETS[fam].items()} | FIXED[fam]
    assert {t: tok.token_to_id(t) for t in want} == want
    assert tok.eos_token_id == want[EOS[fam]]
    for t, tid in want.items():
        assert tok.encode(f"a{t}b")[len(BOS[fam]):].count(tid) == 1, t
    ids = tok.encode(CHAT[fam])
    assert ids[: len(BOS[fam])] == BOS[fam] and (fam != "qwen2" or ids[0] != tok.token_to_id("<|endoftext|>"))
    assert ids.count(tok.token_to_id("<img>")) == CHAT[fam].count("<img>") == 1
    with pytest.raises(CheckpointError):
        tok.token_to_id("<not-a-token>")


@pytest.mark.parametrize("fam", RECIPES)
def test_round_trip_and_skipping_specials(dirs, fam):
    seed = random.randrange(2**31)
    tok = load_tokenizer(dirs[fam])
    for text in random_texts(seed) + [SYSTEM]:
        want = unicodedata.normalize("NFC", text) if fam == "qwen2" else text  # Qwen2 normalizes to NFC
        assert tok.decode(tok.encode(text)) == want, f"seed {seed}: {text!r}"
    decoded = tok.decode(tok.encode(CHAT[fam]))
    assert not any(t in decoded for t in OFFSETS[fam]), decoded
    assert "这是什么" in decoded or SYSTEM in decoded
    if fam in ("qwen2", "qwen"):  # byte-level BPE is lossless even around special tokens
        assert tok.decode(tok.encode(CHAT[fam]), skip_special_tokens=False) == CHAT[fam]


@pytest.mark.parametrize("fam", ["qwen2", "phi3"])
def test_matches_transformers_autotokenizer(dirs, fam):
    seed = random.randrange(2**31)
    ours = load_tokenizer(dirs[fam])
    ref = AutoTokenizer.from_pretrained(dirs[fam], trust_remote_code=False)
    assert ours.vocab_size == len(ref)
    assert ours.eos_token_id == ref.eos_token_id
    for text in random_texts(seed, lead_space=fam == "qwen2") + [CHAT[fam], SYSTEM, "<|im_start|>user\n你好<|im_end|>"]:
        ids = ref.encode(text)
        assert ours.encode(text) == ids, f"seed {seed}: {text!r}"
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), f"seed {seed}: {text!r}"


def test_phi3_tokenizer_json_matches_its_sentencepiece_model(dirs):
    seed = random.randrange(2**31)
    sp = spm.SentencePieceProcessor(model_file=str(dirs["phi3"] / "tokenizer.model"))
    tok = load_tokenizer(dirs["phi3"])
    for text in random_texts(seed):
        assert tok.encode(text) == [1] + sp.encode(text), f"seed {seed}: {text!r}"


def test_internlm2_sentencepiece_form_matches_sentencepiece(dirs):
    seed = random.randrange(2**31)
    d = dirs["internlm2"]
    assert not (d / "tokenizer.json").exists()  # InternLM2 ships tokenizer.model + remote code only
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    tok = load_tokenizer(d)
    for text in random_texts(seed):
        assert tok.encode(text) == [1] + sp.encode(text), f"seed {seed}: {text!r}"
    # The chat tokens are the last pieces of the sentencepiece vocabulary, as in InternLM2 (92538..92543).
    assert sp.id_to_piece(sp.get_piece_size() - 1) == "<|im_start|>"


def test_sentencepiece_loader_matches_transformers_on_phi3(dirs, tmp_path):
    """The sentencepiece + added-tokens path, checked against AutoTokenizer on the same Phi-3 files."""
    seed = random.randrange(2**31)
    sp_only = tmp_path / "sp"
    shutil.copytree(dirs["phi3"], sp_only, ignore=shutil.ignore_patterns("tokenizer.json"))
    ours = load_tokenizer(sp_only)
    ref = AutoTokenizer.from_pretrained(dirs["phi3"], trust_remote_code=False)
    for text in random_texts(seed, lead_space=False) + [CHAT["phi3"], "<|user|>\n  hi<|end|>\n<|assistant|>"]:
        assert ours.encode(text) == ref.encode(text), f"seed {seed}: {text!r}"


def test_copied_tokenizer_json_gets_internvl_tokens_from_config(dirs, tmp_path):
    """InternVL2-1B after download: a Qwen2 tokenizer.json without `<img>`…; tokenizer_config.json adds them."""
    d = tmp_path / "downloaded"
    shutil.copytree(dirs["qwen2"], d)
    plain = load_tokenizer(dirs["qwen2"])
    raw = RawTokenizer.from_file(str(_qwen2_json_without_internvl(d)))
    assert raw.token_to_id("<img>") is None
    tok = load_tokenizer(d)
    assert tok.vocab_size == plain.vocab_size
    assert tok.encode(CHAT["qwen2"]) == plain.encode(CHAT["qwen2"])


def _qwen2_json_without_internvl(d: Path) -> Path:
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

    vocab, merges = models.BPE.read_file(str(d / "vocab.json"), str(d / "merges.txt"))
    raw = RawTokenizer(models.BPE(vocab, merges))
    raw.normalizer = normalizers.NFC()
    pattern = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    raw.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def test_qwen_vl_single_bytes_are_their_own_ids(dirs):
    """QWenTokenizer writes an image path as ids = byte values, so ranks 0..255 must be the single bytes."""
    tok = load_tokenizer(dirs["qwen"])
    assert [tok.encode(chr(b))[0] for b in range(32, 127)] == list(range(32, 127))
    assert tok.decode(list(b"/tmp/x.jpg")) == "/tmp/x.jpg"


def test_missing_tokenizer_says_what_to_do(dirs, tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy(dirs["qwen2"] / "tokenizer_config.json", d)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json.*vlmbuild download.*adds tokenizer\.json"):
        load_tokenizer(d)
