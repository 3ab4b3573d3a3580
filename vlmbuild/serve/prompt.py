"""Chat messages → a prompt of text segments and image slots, ready for fake-id tokenization.

Data structure handed to the engine: `Prompt.parts`, a tuple of `str | ImageSlot` in prompt order.
- A `str` is rendered template text; tokenize it with `add_special_tokens=False` (the engine adds
  the family's BOS once, in front). Slots always sit right after `<img>` and right before `</img>`,
  which are special tokens, so tokenizing the segments one by one gives the same ids as tokenizing
  the whole string.
- An `ImageSlot(image, n_tokens, offset)` stands for `n_tokens` = tiles x tokens_per_patch image
  tokens of image number `image`; it becomes the fake ids `vocab_size + offset + [0, n_tokens)`.
  Slots appear in image order and `offset` is the running sum, so the prompt table is the vision
  outputs of `Prompt.images` concatenated in order: `[Σ n_tokens, hidden]` (trtllm-facts §5.1).
`Prompt.text()` renders each slot as its context token (`<IMG_CONTEXT>` / `<imgpad>`) repeated, i.e.
the string InternVL's `chat()` would tokenize.

Engine flow: `refs = image_refs(messages, style, images)` (validates placeholders before any
download) → load + preprocess each ref (`ref.video_frame` → one tile) → `build_prompt(…, tiles)`.

Image styles (`IMAGE_STYLES`, chosen by the template's `image_style`):
- `internvl` (model-facts §4): the user text carries one `<image>` per image of that message, replaced
  left to right by `<img>` + slot + `</img>`; a request with exactly one image and no `<image>`
  anywhere gets `<image>\\n` prepended to that message (`chat()` does this). Text parts are joined
  with `\\n` (vLLM's rule for multi-part content). `Frame<k>: <image>` marks a video frame.
- `qwen-vl` (§5.4–5.5): each image part becomes `Picture {k}: <img>` + slot + `</img>\\n` where it
  stands (k restarts per message, like `from_list_format`); inline `<img>URL</img>` in the text is
  an image at that place, kept exactly as written.
Top-level `images` (ms-swift) fill the `<image>` placeholders of user messages that have no image
parts, in order; with no placeholder at all they lead the first user message.

Whitespace follows the official models, not grps (which does `lstrip('\\n')` + `rstrip()` on every
message): user text is used as written (InternVL `chat()`, Qwen `make_context`), assistant text is
`strip()`ped, as `chat()` stores its answers in the history it later re-renders.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from vlmbuild.errors import RequestError
from vlmbuild.serve.protocol import ChatMessage, TextPart
from vlmbuild.serve.templates import Template, get_template

PLACEHOLDER = "<image>"
_FRAME_LABEL = re.compile(r"Frame-?\d+:\s*$")
_INLINE_IMAGE = re.compile(r"<img>(.*?)</img>", re.DOTALL)


@dataclass(frozen=True)
class ImageRef:
    url: str
    video_frame: bool = False
    """Preprocess as a video frame: exactly one tile (InternVL `load_video(max_num=1)`)."""


@dataclass(frozen=True)
class ImageSlot:
    image: int
    """Index into `Prompt.images`."""
    n_tokens: int
    """tiles x tokens_per_patch."""
    offset: int
    """Image tokens before this slot in the prompt: first fake id is `vocab_size + offset`."""


@dataclass(frozen=True)
class Prompt:
    parts: tuple[str | ImageSlot, ...]
    images: tuple[ImageRef, ...]
    stop: tuple[str, ...]
    """Template stop strings (client stop strings come on top)."""
    context_token: str
    """Token string one image position stands for, used only by `text()`."""

    @property
    def slots(self) -> tuple[ImageSlot, ...]:
        return tuple(p for p in self.parts if isinstance(p, ImageSlot))

    @property
    def image_tokens(self) -> int:
        return sum(s.n_tokens for s in self.slots)

    def text(self) -> str:
        return "".join(p if isinstance(p, str) else self.context_token * p.n_tokens for p in self.parts)


@dataclass
class _Image:
    ref: ImageRef
    before: str = "<img>"
    after: str = "</img>"
    numbered: bool = True
    """Qwen-VL: an image part (gets `Picture k: `), not a user-written `<img>URL</img>`."""


@dataclass
class _Turn:
    role: str
    items: list[str | _Image]
    where: str
    """`messages[i]`, for error messages."""

    def text_pieces(self) -> list[str]:
        return [x for x in self.items if isinstance(x, str)]

    def image_items(self) -> list[_Image]:
        return [x for x in self.items if isinstance(x, _Image)]


class ImageStyle(Protocol):
    name: str
    context_token: str

    def place(self, turns: list[_Turn], extra_urls: Sequence[str]) -> None:
        """Bind top-level images, check placeholders, and leave every turn's `items` in prompt order."""


# ---- message normalisation ---------------------------------------------------------------------


def _content_items(msg: ChatMessage) -> list[str | _Image]:
    if msg.content is None:
        return []
    if isinstance(msg.content, str):
        return [msg.content]
    return [p.text if isinstance(p, TextPart) else _Image(ImageRef(p.image_url.url)) for p in msg.content]


def _text_only(items: list[str | _Image], where: str, role: str) -> str:
    if any(isinstance(x, _Image) for x in items):
        raise RequestError(f"{where}: {role} messages cannot hold images; send images in user messages", param="messages")
    return "\n".join(items)  # type: ignore[arg-type]


def _split_messages(messages: Sequence[ChatMessage]) -> tuple[str | None, list[_Turn]]:
    system, turns = None, []
    for i, msg in enumerate(messages):
        where, items = f"messages[{i}]", _content_items(msg)
        if msg.role == "system":
            if i != 0:
                raise RequestError(f"{where}: a system message is only accepted as the first message", param="messages")
            system = _text_only(items, where, "system")
        elif msg.role == "assistant":
            turns.append(_Turn("assistant", [_text_only(items, where, "assistant").strip()], where))
        else:
            turns.append(_Turn("user", items, where))
    if not any(t.role == "user" for t in turns):
        raise RequestError("messages hold no user message", param="messages")
    return system, turns


def _bind_extra(turns: list[_Turn], extra_urls: Sequence[str], count: dict[int, int]) -> dict[int, list[str]]:
    """Top-level image URLs per user-turn position: fill `count[pos]` placeholders in turn order, or
    all to the first user turn when there is no placeholder."""
    if not extra_urls:
        return {}
    total = sum(count.values())
    if total == 0:
        first = next(pos for pos, t in enumerate(turns) if t.role == "user")
        return {first: list(extra_urls)}
    if total != len(extra_urls):
        raise RequestError(
            f"the request has {len(extra_urls)} top-level images but {total} {PLACEHOLDER} placeholders in user messages without image parts",
            param="images",
        )
    bound, urls = {}, iter(extra_urls)
    for pos, n in count.items():
        bound[pos] = [next(urls) for _ in range(n)]
    return bound


# ---- image styles ------------------------------------------------------------------------------


class InternVLImages:
    """`<image>` placeholders → `<img>` slot `</img>` (InternVL `chat()`; model-facts §4)."""

    name = "internvl"
    context_token = "<IMG_CONTEXT>"

    def place(self, turns: list[_Turn], extra_urls: Sequence[str]) -> None:
        users = [(pos, t) for pos, t in enumerate(turns) if t.role == "user"]
        texts = {pos: "\n".join(t.text_pieces()) for pos, t in users}
        images = {pos: t.image_items() for pos, t in users}
        free = {pos: texts[pos].count(PLACEHOLDER) for pos, _ in users if not images[pos]}
        for pos, urls in _bind_extra(turns, extra_urls, free).items():
            images[pos] += [_Image(ImageRef(u)) for u in urls]
        holders = [pos for pos, imgs in images.items() if imgs]
        if sum(len(v) for v in images.values()) == 1 and not any(PLACEHOLDER in s for s in texts.values()):
            texts[holders[0]] = f"{PLACEHOLDER}\n" + texts[holders[0]]
        for pos, turn in users:
            turn.items = self._interleave(turn.where, texts[pos], images[pos])

    @staticmethod
    def _interleave(where: str, text: str, images: list[_Image]) -> list[str | _Image]:
        pieces = text.split(PLACEHOLDER)
        if len(pieces) - 1 != len(images):
            raise RequestError(
                f"{where} has {len(pieces) - 1} {PLACEHOLDER} placeholder(s) but {len(images)} image(s); "
                f"write one {PLACEHOLDER} per image, e.g. 'Image-1: {PLACEHOLDER}\\nImage-2: {PLACEHOLDER}\\n…'",
                param="messages",
                code="image_count_mismatch",
            )
        items: list[str | _Image] = [pieces[0]]
        for image, before, after in zip(images, pieces, pieces[1:]):
            frame = bool(_FRAME_LABEL.search(before))
            items += [_Image(ImageRef(image.ref.url, video_frame=frame)), after]
        return items


class QwenVLImages:
    """Image parts → `Picture {k}: <img>` slot `</img>\\n` in place (Qwen-VL; model-facts §5.4)."""

    name = "qwen-vl"
    context_token = "<imgpad>"

    def place(self, turns: list[_Turn], extra_urls: Sequence[str]) -> None:
        users = [(pos, t) for pos, t in enumerate(turns) if t.role == "user"]
        for _, turn in users:
            turn.items = [y for x in _merge_text(turn.items) for y in (_inline_images(x) if isinstance(x, str) else [x])]
        free = {pos: sum(s.count(PLACEHOLDER) for s in t.text_pieces()) for pos, t in users if not t.image_items()}
        for pos, urls in _bind_extra(turns, extra_urls, free).items():
            turns[pos].items = _fill_placeholders(turns[pos].items, urls) if free.get(pos) else [_Image(ImageRef(u)) for u in urls] + turns[pos].items
        for _, turn in users:
            numbered = [x for x in turn.image_items() if x.numbered]
            for k, image in enumerate(numbered, start=1):
                image.before, image.after = f"Picture {k}: <img>", "</img>\n"


def _merge_text(items: list[str | _Image]) -> list[str | _Image]:
    """Adjacent text parts joined by a newline; images stay where they are."""
    out: list[str | _Image] = []
    for x in items:
        if isinstance(x, str) and out and isinstance(out[-1], str):
            out[-1] = f"{out[-1]}\n{x}"
        else:
            out.append(x)
    return out


def _inline_images(text: str) -> list[str | _Image]:
    pieces = _INLINE_IMAGE.split(text)  # [text, url, text, url, …, text]
    return [p if i % 2 == 0 else _Image(ImageRef(p.strip()), numbered=False) for i, p in enumerate(pieces)]


def _fill_placeholders(items: list[str | _Image], urls: list[str]) -> list[str | _Image]:
    out: list[str | _Image] = []
    queue = iter(urls)
    for x in items:
        if not isinstance(x, str):
            out.append(x)
            continue
        pieces = x.split(PLACEHOLDER)
        out.append(pieces[0])
        for piece in pieces[1:]:
            out += [_Image(ImageRef(next(queue))), piece]
    return out


IMAGE_STYLES: dict[str, ImageStyle] = {s.name: s for s in (InternVLImages(), QwenVLImages())}


def get_image_style(style: ImageStyle | str) -> ImageStyle:
    if not isinstance(style, str):
        return style
    try:
        return IMAGE_STYLES[style]
    except KeyError:
        raise ValueError(f"unknown image style '{style}'; known: {', '.join(sorted(IMAGE_STYLES))}") from None


# ---- public API --------------------------------------------------------------------------------


def _layout(messages: Sequence[ChatMessage], style: ImageStyle, images: Sequence[str]) -> tuple[str | None, list[_Turn]]:
    system, turns = _split_messages(messages)
    style.place(turns, images)
    return system, turns


def _refs(turns: list[_Turn]) -> list[ImageRef]:
    return [x.ref for t in turns for x in t.image_items()]


def image_refs(messages: Sequence[ChatMessage], image_style: ImageStyle | str, images: Sequence[str] = ()) -> list[ImageRef]:
    """The request's images in prompt order (the order `tiles_per_image` must follow); raises
    `RequestError` for placeholder/image count mismatches before anything is downloaded."""
    return _refs(_layout(messages, get_image_style(image_style), images)[1])


def build_prompt(
    messages: Sequence[ChatMessage],
    template: Template | str,
    image_style: ImageStyle | str | None,
    tiles_per_image: Sequence[int],
    tokens_per_patch: int = 256,
    *,
    images: Sequence[str] = (),
) -> Prompt:
    """Render `messages` with `template` (style None = the template's own) into text segments and
    image slots; `tiles_per_image[k]` is the tile count of `image_refs(...)[k]`."""
    template = get_template(template) if isinstance(template, str) else template
    style = get_image_style(image_style or template.image_style)
    system, turns = _layout(messages, style, images)
    refs = _refs(turns)
    if len(tiles_per_image) != len(refs) or any(n < 1 for n in tiles_per_image):
        raise ValueError(f"tiles_per_image {list(tiles_per_image)} does not fit the request's {len(refs)} images")
    parts = _render(template, template.default_system if system is None else system, turns, [n * tokens_per_patch for n in tiles_per_image])
    return Prompt(parts=parts, images=tuple(refs), stop=template.stop, context_token=style.context_token)


def _render(template: Template, system: str, turns: list[_Turn], n_tokens: list[int]) -> tuple[str | ImageSlot, ...]:
    out: list[str | ImageSlot] = [template.system_template.format(system=system), template.sep]
    k = offset = 0
    for turn in turns:
        body: list[str | ImageSlot] = []
        for item in turn.items:
            if isinstance(item, str):
                body.append(item)
                continue
            body += [item.before, ImageSlot(k, n_tokens[k], offset), item.after]
            k, offset = k + 1, offset + n_tokens[k]
        role = template.user_role if turn.role == "user" else template.assistant_role
        # MPT renders an empty turn as the bare role (conversation.py `if message`); chatml keeps sep.
        closing = [template.sep] if any(body) or template.empty_turn_sep else []
        out += [template.turn_prefix, role, *body, *closing]
    out += [template.turn_prefix, template.assistant_role]
    return _join_strings(out)


def _join_strings(parts: list[str | ImageSlot]) -> tuple[str | ImageSlot, ...]:
    out: list[str | ImageSlot] = []
    for p in parts:
        if isinstance(p, str):
            if not p:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += p
                continue
        out.append(p)
    return tuple(out)
