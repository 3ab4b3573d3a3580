"""`qwen.tiktoken` → tokenizer.json, checked against the `tiktoken` library on the same file."""

from __future__ import annotations

import base64
import random

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from fakehub import FakeHub, FakeRepo, route_client_to  # tests/ is on sys.path (no __init__.py there)
from vlmbuild.errors import CheckpointError
from vlmbuild.hub import HF_MANIFEST_KIND, download
from vlmbuild.manifest import MANIFEST, read_manifest
from vlmbuild.recipe import load_recipe
from vlmbuild.synth import synth_checkpoint
from vlmbuild.tiktoken_hf import tiktoken_to_tokenizer_json
from vlmbuild.tokenizer import QWEN2_PATTERN, QWEN_SPECIALS

REPO = "Qwen/Qwen-VL-Chat"
WORDS = ("the", "image", "picture", "shows", "a", "red", "bicycle", "cat", "dog", "Hello", "World", "ASSISTANT",
         "it's", "WE'LL", "they've", "I'm", "naïve", "café", "Straße", "def", "return", "print", "x_1", "foo.bar")
HANZI = "你好世界这是一个图片中有只猫和狗在草地上玩耍北京上海深圳模型测试的文字欢迎光临"
SPACES = (" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "    \n", "\t \t", "\u3000")
PUNCT = ("!", "?", ",", ".", "...", "：", "，", "。", "(", ")", "<", ">", "[[", "]]", "'", '"', "--", "🎉", "😀")


def _piece(rng: random.Random, kind: str) -> str:
    if kind == "ascii":
        return rng.choice(WORDS) if rng.random() < 0.7 else "".join(rng.choices("abcdefghijklmnopqrstuvwxyzQZ", k=rng.randint(1, 9)))
    if kind == "hanzi":
        pool = HANZI if rng.random() < 0.7 else [chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(8)]
        return "".join(rng.choices(pool, k=rng.randint(1, 6)))
    if kind == "digits":
        return str(rng.randrange(10 ** rng.randint(1, 12)))
    if kind == "space":
        return "".join(rng.choices(SPACES, k=rng.randint(1, 3)))
    if kind == "special":
        return rng.choice(QWEN_SPECIALS)
    return rng.choice(PUNCT)


def random_text(rng: random.Random, kinds: tuple[str, ...]) -> str:
    out = []
    for _ in range(rng.randint(1, 25)):
        out.append(_piece(rng, rng.choice(kinds)))
        out.append(rng.choice(("", " ", " ", rng.choice(SPACES))))
    return "".join(out)


TEXT_KINDS = {
    "ascii": ("ascii", "punct"),
    "chinese": ("hanzi", "punct"),
    "mixed": ("ascii", "hanzi", "digits", "space", "punct"),
    "whitespace": ("space", "ascii"),
    "digits": ("digits", "space"),
    "specials": ("special", "ascii", "hanzi", "space"),
}


def reference(path) -> tiktoken.Encoding:
    """QWenTokenizer's encoding (tokenization_qwen.py): the file's ranks, its split pattern, specials after the ranks."""
    ranks = load_tiktoken_bpe(str(path))
    specials = {s: len(ranks) + k for k, s in enumerate(QWEN_SPECIALS)}
    return tiktoken.Encoding("qwen-ref", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def write_trained_tiktoken(path, rng: random.Random, vocab_size: int) -> None:
    """A bigger vocabulary than the tiny checkpoint's: byte-level BPE trained on fresh random text, as tiktoken lines."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [random_text(rng, TEXT_KINDS["mixed"]) for _ in range(3000)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    trained = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    ranks = [bytes([b]) for b in range(256)] + [bytes(byte_of[c] for c in t) for t, _ in trained if len(t) > 1]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))


@pytest.fixture
def seed() -> int:
    return random.randrange(2**32)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-qwen-vl") / "model"
    synth_checkpoint(load_recipe("tiny-qwen-vl-chat"), out)
    return out


@pytest.fixture(scope="module", params=["tiny-checkpoint", "trained-3000"])
def model_dir(request, tiny_dir, tmp_path_factory):
    if request.param == "tiny-checkpoint":
        return tiny_dir
    out = tmp_path_factory.mktemp("trained")
    write_trained_tiktoken(out / "qwen.tiktoken", random.Random(random.randrange(2**32)), 3000)
    return out


@pytest.mark.parametrize("kind", sorted(TEXT_KINDS))
def test_ids_and_decode_match_tiktoken(model_dir, kind, seed):
    path = tiktoken_to_tokenizer_json(model_dir)
    ref = reference(model_dir / "qwen.tiktoken")
    fast = Tokenizer.from_file(str(path))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    rng = random.Random(seed)
    for _ in range(40):
        text = random_text(rng, TEXT_KINDS[kind])
        want = ref.encode(text, allowed_special="all")
        got = fast.encode(text, add_special_tokens=False).ids
        assert got == want, f"tokenizers ids differ on {text!r} (seed {seed}, {model_dir.name})"
        assert hf.encode(text, add_special_tokens=False) == want, f"transformers ids differ on {text!r} (seed {seed})"
        assert fast.decode(got, skip_special_tokens=False) == text, f"decode of {text!r} (seed {seed})"
        assert hf.decode(got, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text, f"seed {seed}"


def test_special_ids_follow_the_ranks(tiny_dir):
    fast = Tokenizer.from_file(str(tiktoken_to_tokenizer_json(tiny_dir)))
    n_ranks = len(load_tiktoken_bpe(str(tiny_dir / "qwen.tiktoken")))
    # model-facts §5.4: <|endoftext|> 151643 = n_ranks, <img> 151857, <imgpad> 151859 on the real file.
    assert [fast.token_to_id(s) - n_ranks for s in ("<|endoftext|>", "<|extra_0|>", "<img>", "<imgpad>")] == [0, 3, 214, 216]
    assert fast.get_vocab_size(with_added_tokens=True) == n_ranks + 217


def test_damaged_tiktoken_fails_in_one_line(tmp_path):
    (tmp_path / "qwen.tiktoken").write_text("IQ== 0\nIg== 2\n")  # rank 1 missing
    with pytest.raises(CheckpointError) as err:
        tiktoken_to_tokenizer_json(tmp_path)
    assert "ranks 0..1" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "tokenizer.json").exists()


@pytest.fixture
def hub(monkeypatch, tmp_path, tiny_dir):
    # As published: the tiktoken file, configs and weights, no tokenizer.json.
    files = {p.name: p.read_bytes() for p in tiny_dir.iterdir() if p.name not in (MANIFEST, "tokenizer.json")}
    with FakeHub({REPO: FakeRepo(files, commit="c" * 40)}) as fake:
        route_client_to(fake, monkeypatch, tmp_path / "hub-cache")
        yield fake


def test_download_converts_qwen_tiktoken(hub, tmp_path, seed):
    model = download(load_recipe("qwen-vl-chat"), tmp_path / "work", show_progress=False)

    published = hub.repos[REPO].files
    assert "tokenizer.json" not in published and "qwen.tiktoken" in published
    manifest = read_manifest(model, HF_MANIFEST_KIND).data
    assert manifest["repo"] == REPO and manifest["commit"] == "c" * 40
    assert manifest["files"] == sorted([*published, "tokenizer.json"])
    assert len(manifest["fixes"]) == 1 and "tokenizer.json" in manifest["fixes"][0], manifest["fixes"]
    assert "tiktoken_to_tokenizer_json" in manifest["fixes"][0], manifest["fixes"]
    fast, ref = Tokenizer.from_file(str(model / "tokenizer.json")), reference(model / "qwen.tiktoken")
    text = random_text(random.Random(seed), TEXT_KINDS["mixed"] + ("special",))
    assert fast.encode(text, add_special_tokens=False).ids == ref.encode(text, allowed_special="all"), f"seed {seed}"


def test_converted_dir_still_loads_with_the_native_tokenizer(tmp_path):
    """After the download fix adds tokenizer.json, vlmbuild keeps reading qwen.tiktoken (which knows
    QWen's specials and eos) rather than the converted file."""
    from vlmbuild.recipe import load_recipe
    from vlmbuild.synth import synth_checkpoint
    from vlmbuild.tiktoken_hf import tiktoken_to_tokenizer_json
    from vlmbuild.tokenizer import TiktokenTokenizer, load_tokenizer

    synth_checkpoint(load_recipe("tiny-qwen-vl-chat"), tmp_path / "hf")
    tiktoken_to_tokenizer_json(tmp_path / "hf")
    tok = load_tokenizer(tmp_path / "hf")
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "hi"
