"""Qwen-VL-Chat's `qwen.tiktoken` → a Hugging Face `tokenizer.json` (model-facts §5.4, §6.5).

The repo ships only the tiktoken form (`base64(token_bytes) rank` per line, specials hard-coded in
remote code); serving stacks that read a fast tokenizer (grps-trtllm, TRT-LLM's tokenizer_dir) need
`tokenizer.json`. tiktoken merges any adjacent pair whose concatenation is a token, while a `tokenizers`
BPE model only merges listed pairs, so each token's merge is recovered as the last step of BPE over its
own bytes restricted to lower ranks (the approach of openai/tiktoken issue #60), and listed in rank
order so merge priority = tiktoken rank.
"""

from __future__ import annotations

import base64
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from vlmbuild.errors import CheckpointError
from vlmbuild.fsutil import atomic_write_text
from vlmbuild.tokenizer import QWEN2_PATTERN, QWEN_SPECIALS

TIKTOKEN_FILE = "qwen.tiktoken"
TOKENIZER_JSON = "tokenizer.json"


def tiktoken_to_tokenizer_json(model_dir: Path) -> Path:
    """Write `model_dir/tokenizer.json` equivalent to `model_dir/qwen.tiktoken` + QWenTokenizer's specials."""
    model_dir = Path(model_dir)
    ranks = read_ranks(model_dir / TIKTOKEN_FILE)
    tok = Tokenizer(models.BPE(_vocab(ranks), _merges(ranks), unk_token=None, byte_fallback=False,
                               ignore_merges=True))  # tiktoken takes a whole piece that is a token as is
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in QWEN_SPECIALS])
    _check_special_ids(tok, len(ranks))
    out = model_dir / TOKENIZER_JSON
    atomic_write_text(out, tok.to_str(pretty=True))
    return out


def read_ranks(path: Path) -> list[bytes]:
    """Token bytes indexed by rank; the ranks must be exactly 0..n-1, as QWenTokenizer's specials follow them."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found: expected Qwen's tiktoken vocabulary", hint="re-run vlmbuild download")

    by_rank: dict[int, bytes] = {}
    for lineno, line in enumerate(path.read_text(encoding="ascii").splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            by_rank[int(rank)] = base64.b64decode(token, validate=True)
        except ValueError as err:
            raise CheckpointError(f"{path}:{lineno}: expected 'base64 rank', found {line[:60]!r}",
                                  hint="the file is damaged; re-run vlmbuild download") from err
    if sorted(by_rank) != list(range(len(by_rank))) or len(set(by_rank.values())) != len(by_rank):
        raise CheckpointError(f"{path}: expected unique tokens at ranks 0..{len(by_rank) - 1}, found gaps or repeats",
                              hint="the file is damaged; re-run vlmbuild download")
    return [by_rank[r] for r in range(len(by_rank))]


def _vocab(ranks: list[bytes]) -> dict[str, int]:
    to_char = _byte_chars()
    return {"".join(to_char[b] for b in token): rank for rank, token in enumerate(ranks)}


def _merges(ranks: list[bytes]) -> list[tuple[str, str]]:
    """One merge per multi-byte token whose restricted BPE ends in exactly two parts, in rank order.

    Cost: O(len) dict lookups and O(len²) list scans (in C) per token: ~5 s for 150k tokens of 11 bytes on average.
    """
    rank_of = {token: rank for rank, token in enumerate(ranks)}
    to_char = _byte_chars()
    merges = []
    for rank, token in enumerate(ranks):
        if len(token) < 2:
            continue
        parts = _bpe(token, rank_of, rank)
        if len(parts) == 2:
            merges.append(tuple("".join(to_char[b] for b in p) for p in parts))
    return merges


def _bpe(token: bytes, rank_of: dict[bytes, int], max_rank: int) -> list[bytes]:
    """tiktoken's merge loop (lowest-rank adjacent pair first) using only tokens ranked below `max_rank`."""
    parts = [token[i:i + 1] for i in range(len(token))]
    # pair[i] = rank of parts[i] + parts[i + 1] (max_rank: not mergeable); only a merge's neighbours change.
    pair = [rank_of.get(token[i:i + 2], max_rank) for i in range(len(token) - 1)]
    while pair and (best := min(pair)) < max_rank:
        at = pair.index(best)
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
        del pair[at]
        if at > 0:
            pair[at - 1] = rank_of.get(parts[at - 1] + parts[at], max_rank)
        if at < len(pair):
            pair[at] = rank_of.get(parts[at] + parts[at + 1], max_rank)
    return parts


def _byte_chars() -> list[str]:
    """GPT-2's byte → printable character map (ByteLevel's alphabet), indexed by byte value."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(shifted)}
    return [table[b] for b in range(256)]


def _check_special_ids(tok: Tokenizer, n_ranks: int) -> None:
    # QWenTokenizer numbers its specials straight after the mergeable ranks (<img> = 151857 on the real file).
    for k, special in enumerate(QWEN_SPECIALS):
        if (got := tok.token_to_id(special)) != n_ranks + k:
            raise CheckpointError(f"special token {special!r} got id {got}, expected {n_ranks + k}",
                                  hint="it is also a mergeable token in qwen.tiktoken: the file is not Qwen's")
