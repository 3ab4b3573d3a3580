"""The checkpoints' own tokenizers behind one small interface, loaded offline without remote code.

Three on-disk forms are read:
  * `tokenizer.json` (Phi-3, and InternVL2-1B after `vlmbuild download` adds it) → `tokenizers`;
  * `vocab.json` + `merges.txt` (InternVL2-1B as published) → a byte-level BPE rebuilt here with the
    pre-tokenizer of the `tokenizer_class` named in tokenizer_config.json;
  * `tokenizer.model` (InternLM2, whose tokenizer class is remote code we do not run) → `sentencepiece`
    plus the added tokens that tokenizer_config.json / added_tokens.json declare;
  * `qwen.tiktoken` (Qwen-VL-Chat) → `tiktoken` with the specials QWenTokenizer hard-codes.
Added tokens are taken from tokenizer_config.json in every form, because a copied tokenizer.json
(InternVL2-1B's comes from Qwen2-0.5B-Instruct) lacks InternVL's `<img>`… tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import sentencepiece as spm
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HfBackend

from vlmbuild.errors import CheckpointError


_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class Tokenizer(Protocol):
    """What the server and the checks need from a tokenizer."""

    vocab_size: int
    """Ids in use, added tokens included (= first id past the last added token)."""
    eos_token_id: int

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, special tokens written in it recognised, BOS added as the model expects."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def is_byte(self, token_id: int) -> bool:
        """Whether the id is a byte-fallback piece (`<0xAB>`), whose text depends on its neighbours."""
        ...

    def token_to_id(self, token: str) -> int:
        """Id of one token; CheckpointError if the vocabulary lacks it."""
        ...


# Qwen2's GPT-4-like split (transformers models/qwen2/tokenization_qwen2.py, PRETOKENIZE_REGEX).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# tokenizer_class → split pattern, for checkpoints that ship vocab.json + merges.txt without tokenizer.json.
BYTE_BPE_PATTERNS: dict[str, str] = {"Qwen2Tokenizer": QWEN2_PATTERN}

# Qwen-VL's tiktoken tokenizer (remote code tokenization_qwen.py) hard-codes its specials after the
# mergeable ranks, in this order (model-facts §5.4): 151643 <|endoftext|> … 151857 <img> … 151859 <imgpad>.
QWEN_CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_EXTRAS = tuple(f"<|extra_{k}|>" for k in range(205))
QWEN_IMAGE_SPECIALS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
QWEN_SPECIALS = QWEN_CHAT_SPECIALS + QWEN_EXTRAS + QWEN_IMAGE_SPECIALS


class AddedTokenSpec(BaseModel):
    """One entry of tokenizer_config.json `added_tokens_decoder`."""

    model_config = ConfigDict(extra="ignore")

    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False


class TokenizerConfig(BaseModel):
    """The tokenizer_config.json fields read here (plus added_tokens.json, merged into `added`)."""

    model_config = ConfigDict(extra="ignore")

    tokenizer_class: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = True
    """Only the sentencepiece form reads it; tokenizer.json carries its own post-processor."""
    added: dict[int, AddedTokenSpec] = Field(default_factory=dict, alias="added_tokens_decoder")

    @field_validator("bos_token", "eos_token", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        # Serialized AddedToken: {"__type": "AddedToken", "content": "<s>", ...}
        return v.get("content") if isinstance(v, dict) else v

    @classmethod
    def read(cls, model_dir: Path) -> "TokenizerConfig":
        path = model_dir / "tokenizer_config.json"
        try:
            cfg = cls.model_validate(_read_json(path)) if path.is_file() else cls()
        except ValidationError as err:
            raise CheckpointError(f"{path} is not a valid tokenizer config: {str(err).splitlines()[0]}") from err
        extra = model_dir / "added_tokens.json"
        for content, tid in (_read_json(extra) if extra.is_file() else {}).items():
            cfg.added.setdefault(int(tid), AddedTokenSpec(content=content))
        return cfg


class HfTokenizer:
    """A `tokenizers` tokenizer with the config's added tokens at their declared ids."""

    def __init__(self, backend: HfBackend, cfg: TokenizerConfig, where: Path):
        for tid, spec in sorted(cfg.added.items()):
            have = backend.token_to_id(spec.content)
            if have is None:
                token = AddedToken(spec.content, single_word=spec.single_word, lstrip=spec.lstrip,
                                   rstrip=spec.rstrip, normalized=spec.normalized, special=spec.special)
                if spec.special:
                    backend.add_special_tokens([token])
                else:
                    backend.add_tokens([token])
                have = backend.token_to_id(spec.content)
            if have != tid:
                raise CheckpointError(f"{where}: added token {spec.content!r} is id {have}, tokenizer_config.json says {tid}",
                                      hint="the tokenizer files come from different checkpoints; re-run vlmbuild download")
        self._tok = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = _eos_id(self, cfg, where)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_byte(self, token_id: int) -> bool:
        return _BYTE_PIECE.match(self._tok.id_to_token(token_id) or "") is not None

    def token_to_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise CheckpointError(f"token {token!r} is not in the tokenizer vocabulary")
        return tid


class SentencePieceTokenizer:
    """sentencepiece model + added tokens, splitting the text on added tokens first (as the slow HF tokenizers do)."""

    def __init__(self, model_file: Path, cfg: TokenizerConfig, where: Path):
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self._added = {spec.content: tid for tid, spec in cfg.added.items()}
        self._content = {tid: spec.content for tid, spec in cfg.added.items()}
        controls = {self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()} - {-1}
        self._special = {tid for tid, spec in cfg.added.items() if spec.special} | controls
        self._split = _added_token_regex(cfg.added.values())
        self._bos = [self._sp.bos_id()] if cfg.add_bos_token and self._sp.bos_id() >= 0 else []
        self.vocab_size = max([self._sp.get_piece_size(), *(t + 1 for t in self._content)])
        self.eos_token_id = _eos_id(self, cfg, where)

    def encode(self, text: str) -> list[int]:
        ids = list(self._bos)
        pos = 0
        for m in self._split.finditer(text) if self._split else ():
            ids += self._sp.encode(text[pos:m.start()]) if m.start() > pos else []
            token = m.group(0) if m.group(0) in self._added else m.group(0).strip()
            ids.append(self._added[token])
            pos = m.end()
        return ids + (self._sp.encode(text[pos:]) if pos < len(text) else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # Skipped specials are dropped first, as the slow HF tokenizers do, so the pieces around them
        # decode as one run ("▁word" after a skipped token keeps its space).
        if skip_special_tokens:
            ids = [t for t in ids if t not in self._special]
        out: list[str] = []
        run: list[int] = []
        for tid in ids:
            if tid not in self._content and tid not in self._special:
                run.append(tid)
                continue
            out.append(self._sp.decode(run))
            run = []
            out.append(self._content.get(tid) or self._sp.id_to_piece(tid))
        return "".join(out) + self._sp.decode(run)

    def is_byte(self, token_id: int) -> bool:
        return token_id < self._sp.get_piece_size() and self._sp.is_byte(token_id)

    def token_to_id(self, token: str) -> int:
        if token in self._added:
            return self._added[token]
        tid = self._sp.piece_to_id(token)
        if self._sp.id_to_piece(tid) != token:
            raise CheckpointError(f"token {token!r} is not in the tokenizer vocabulary")
        return tid


class TiktokenTokenizer:
    """Qwen-VL's `qwen.tiktoken` (base64 token, rank per line) + the specials QWenTokenizer appends; no BOS.

    The `<img>path</img>` → byte ids + `<imgpad>` rewrite of QWenTokenizer is prompt building, not done here.
    """

    def __init__(self, path: Path):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(path))
        specials = {t: len(ranks) + k for k, t in enumerate(QWEN_SPECIALS)}
        self._enc = tiktoken.Encoding("qwen", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        self._specials = specials
        self._first_special = len(ranks)
        self.vocab_size = len(ranks) + len(specials)
        self.eos_token_id = specials["<|endoftext|>"]

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # QWenTokenizer drops every id >= eod_id (the first special) when skipping.
        keep = [i for i in ids if i < self._first_special] if skip_special_tokens else list(ids)
        return self._enc.decode(keep, errors="replace")

    def is_byte(self, token_id: int) -> bool:
        return False  # byte-level BPE: its decode never rewrites earlier complete characters

    def token_to_id(self, token: str) -> int:
        if token in self._specials:
            return self._specials[token]
        try:
            return self._enc.encode_single_token(token.encode("utf-8"))
        except KeyError:
            raise CheckpointError(f"token {token!r} is not in the tokenizer vocabulary") from None


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint directory, from whichever supported form it ships."""
    model_dir = Path(model_dir)
    cfg = TokenizerConfig.read(model_dir)
    if (model_dir / "qwen.tiktoken").is_file():  # native form first; a converted tokenizer.json is for other tools
        return TiktokenTokenizer(model_dir / "qwen.tiktoken")
    if (model_dir / "tokenizer.json").is_file():
        return HfTokenizer(HfBackend.from_file(str(model_dir / "tokenizer.json")), cfg, model_dir)
    if (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        return HfTokenizer(_byte_bpe(model_dir, cfg), cfg, model_dir)
    if (model_dir / "tokenizer.model").is_file():
        return SentencePieceTokenizer(model_dir / "tokenizer.model", cfg, model_dir)
    hint = "run `vlmbuild download`, which adds tokenizer.json" if cfg.tokenizer_class in BYTE_BPE_PATTERNS else (
        "run `vlmbuild download` to fetch the tokenizer files")
    raise CheckpointError(f"{model_dir} has no tokenizer: expected tokenizer.json, vocab.json + merges.txt, tokenizer.model "
                          "or qwen.tiktoken", hint=hint)


def _byte_bpe(model_dir: Path, cfg: TokenizerConfig) -> HfBackend:
    pattern = BYTE_BPE_PATTERNS.get(cfg.tokenizer_class or "")
    if pattern is None:
        raise CheckpointError(f"{model_dir}: cannot rebuild tokenizer class {cfg.tokenizer_class!r} from vocab.json + merges.txt",
                              hint="add a tokenizer.json (re-run vlmbuild download)")
    vocab, merges = models.BPE.read_file(str(model_dir / "vocab.json"), str(model_dir / "merges.txt"))
    tok = HfBackend(models.BPE(vocab, merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _added_token_regex(specs) -> re.Pattern[str] | None:
    # Longest first, so `<|im_start|>` wins over any token that is its prefix; rstrip/lstrip eat the
    # adjacent whitespace as transformers' AddedToken does (`_token_of` strips it again).
    parts = [(r"\s*" if s.lstrip else "") + re.escape(s.content) + (r"\s*" if s.rstrip else "")
             for s in sorted(specs, key=lambda s: -len(s.content))]
    return re.compile("|".join(parts)) if parts else None


def _eos_id(tok: Tokenizer, cfg: TokenizerConfig, where: Path) -> int:
    if not cfg.eos_token:
        raise CheckpointError(f"{where}/tokenizer_config.json names no eos_token", hint="is the checkpoint complete?")
    return tok.token_to_id(cfg.eos_token)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
