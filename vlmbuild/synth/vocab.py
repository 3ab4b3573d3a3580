"""Tiny tokenizers of the real kinds, trained offline on a built-in corpus, and their config files.

Byte-level BPE (`tokenizers`) stands in for Qwen2's vocab.json/merges.txt; a sentencepiece BPE with
byte fallback for InternLM2's and Phi-3's tokenizer.model. Ids are small, the special tokens are the
real ones in the real order.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from vlmbuild.fsutil import write_json
from vlmbuild.tokenizer import QWEN2_PATTERN

# InternVL's tokens, added after the LLM's own in this order (model-facts §4; IVL train/constants.py).
INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")

CORPUS = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
    "You are a helpful assistant. Please describe the image in detail.",
    "The picture shows a red bicycle leaning against a wooden fence next to a small garden.",
    "Two cats are sleeping on a blue sofa, and a dog is watching them from the doorway.",
    "What is written on the sign? The sign says: Welcome to the harbor, open from 9:00 to 17:30.",
    "请详细描述这张图片。图片中有一只猫和一只狗，它们在草地上玩耍。",
    "这是一个关于多模态模型的测试句子，包含中文和English混合的内容。",
    "今天天气很好，我们去公园散步吧。北京、上海和深圳都是大城市。",
    "Image-1: <image>\nImage-2: <image>\nWhat are the differences between the two images?",
    "Frame1: <image>\nFrame2: <image>\nWhat happens in this video?",
    "Please provide the bounding box coordinates of the region this sentence describes: <ref>the man</ref>",
    "<ref>a white car</ref><box>[[120, 340, 560, 780]]</box> is parked near the building.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > | ; : , . ? !",
    "def add(a, b):\n    return a + b\n\nprint(add(3, 4))\n",
    "Answer the question using a single word or phrase. Yes, no, maybe; it's the user's choice.",
    "The model converts checkpoints into engines and serves them behind an OpenAI compatible server.",
    "user\nassistant\nsystem\nHello! How can I help you today?\nI'm fine, thanks. And you?\n",
    "图像中的文字是什么？答案：欢迎光临。数字是42和2024年7月19日。",
)


@dataclass(frozen=True)
class Added:
    """One added token as tokenizer_config.json `added_tokens_decoder` declares it."""

    content: str
    special: bool = True
    rstrip: bool = False

    def as_json(self) -> dict:
        return {"content": self.content, "lstrip": False, "normalized": False, "rstrip": self.rstrip,
                "single_word": False, "special": self.special}


@dataclass(frozen=True)
class Vocab:
    """What the LLM config needs from the tokenizer written next to it."""

    size: int
    """First id past the last added token (the LLM config's vocab_size)."""
    ids: dict[str, int]
    """Id of every added / special token."""


def train_byte_bpe(vocab_size: int) -> Tokenizer:
    """Qwen2-style byte-level BPE: NFC, the GPT-4-like split, then bytes → printable characters."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def train_sentencepiece(vocab_size: int, add_dummy_prefix: bool, tail_pieces: Sequence[str] = ()) -> bytes:
    """A serialized sentencepiece BPE model: <unk>=0, <s>=1, </s>=2, 256 byte-fallback pieces, merges.

    `tail_pieces` are appended as user-defined pieces at the end of the vocabulary, where InternLM2
    keeps its chat tokens (92538..92543 of 92544).
    """
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=add_dummy_prefix,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    for piece in tail_pieces:
        proto.pieces.add(piece=piece, score=0.0, type=sp_pb2.ModelProto.SentencePiece.USER_DEFINED)
    return proto.SerializeToString()


def sentencepiece_size(model: bytes) -> int:
    return spm.SentencePieceProcessor(model_proto=model).get_piece_size()


def write_tokenizer_config(out: Path, added: dict[int, Added], fields: dict, special_map: dict) -> None:
    """tokenizer_config.json (`added_tokens_decoder` + the class's fields) and special_tokens_map.json."""
    decoder = {str(tid): tok.as_json() for tid, tok in sorted(added.items())}
    write_json(out / "tokenizer_config.json", {"added_tokens_decoder": decoder, **fields})
    write_json(out / "special_tokens_map.json", special_map)


def write_added_tokens(out: Path, added: dict[int, Added], first_id: int) -> None:
    """added_tokens.json: the tokens at or past `first_id` (those added on top of the base vocabulary)."""
    write_json(out / "added_tokens.json", {tok.content: tid for tid, tok in sorted(added.items()) if tid >= first_id})
