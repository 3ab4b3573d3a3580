"""Image URLs → RGB PIL images, under an operator policy (vLLM's media rules, peers.md §5.2–5.3).

Accepted: `data:image/<x>;base64,<b64>` (base64 only), `http(s)://` (timeout, byte cap, redirects
only to http(s), at most `max_redirects`), and `file://` only when the operator named a directory and
the resolved path (symlinks followed) lies inside it. Every failure is a `RequestError` (HTTP 400)
naming the image by index and a shortened URL; a broken image is never replaced by a stand-in.

`load_image` blocks (network, decoding): an async server calls it from a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from PIL import Image

from vlmbuild.errors import RequestError

_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)
_REDIRECTS = {301, 302, 303, 307, 308}


@dataclass(frozen=True)
class MediaPolicy:
    """What the server may fetch or read on a client's behalf."""

    allowed_local_media_path: Path | None = None
    """Directory `file://` URLs must resolve into; None refuses every `file://` URL."""
    fetch_timeout_s: float = 5.0
    """Whole-download deadline for one http(s) image (vLLM `VLLM_IMAGE_FETCH_TIMEOUT` default)."""
    max_image_bytes: int = 20 * 2**20
    """Largest encoded image accepted from any source."""
    max_image_pixels: int = 64 * 2**20
    """Largest width x height decoded (decompression-bomb guard, checked from the header)."""
    max_redirects: int = 3


def shorten_url(url: str, limit: int = 60) -> str:
    """A URL short enough for a one-line error; data URLs keep only their header."""
    if url[:5].lower() == "data:":
        head = url.split(",", 1)[0]
        return f"{head[:limit]},…({len(url)} chars)"
    return url if len(url) <= limit else url[: limit - 1] + "…"


def load_image(url: str, policy: MediaPolicy, index: int = 0) -> Image.Image:
    """Fetch or decode image number `index` of a request as an RGB image."""
    try:
        data = _read_bytes(url, policy)
        return _decode(data, policy)
    except _MediaFailure as failure:
        raise RequestError(f"image {index} ({shorten_url(url)}): {failure}", param="messages", code="invalid_image") from None


class _MediaFailure(Exception):
    """Reason an image could not be loaded; `load_image` adds which image it was."""


def _read_bytes(url: str, policy: MediaPolicy) -> bytes:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _read_data_url(url, policy)
    if scheme in ("http", "https"):
        return _fetch_http(url, policy)
    if scheme == "file":
        return _read_local(url, policy)
    raise _MediaFailure("unsupported URL; use http(s)://, data:image/<type>;base64,… or file://")


def _read_data_url(url: str, policy: MediaPolicy) -> bytes:
    match = _DATA_URL.match(url)
    if not match:
        raise _MediaFailure("malformed data URL; expected data:image/<type>;base64,<data>")
    mime = match["mime"].lower()
    if mime and not mime.startswith("image/"):
        raise _MediaFailure(f"data URL media type is {mime}, expected image/*")
    if "base64" not in [p.strip().lower() for p in match["params"].split(";")]:
        raise _MediaFailure("only base64 data URLs are supported (add ;base64)")
    payload = re.sub(r"\s+", "", url[match.end() :])
    if len(payload) * 3 // 4 > policy.max_image_bytes:
        raise _MediaFailure(f"image is larger than the {policy.max_image_bytes} byte limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _MediaFailure(f"invalid base64 data ({exc})") from None


def _read_local(url: str, policy: MediaPolicy) -> bytes:
    root = policy.allowed_local_media_path
    if root is None:
        raise _MediaFailure("local files are disabled; start the server with --allowed-local-media-path DIR")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise _MediaFailure(f"file:// URLs must name a local path, got host '{parts.netloc}'")
    path = Path(unquote(parts.path)).resolve()
    allowed = Path(root).resolve()
    if not path.is_relative_to(allowed):
        raise _MediaFailure(f"path is outside the allowed media directory {allowed}")
    if not path.is_file():
        raise _MediaFailure("no such file")
    if path.stat().st_size > policy.max_image_bytes:
        raise _MediaFailure(f"image is larger than the {policy.max_image_bytes} byte limit")
    return path.read_bytes()


def _fetch_http(url: str, policy: MediaPolicy) -> bytes:
    deadline = time.monotonic() + policy.fetch_timeout_s
    timeout = httpx.Timeout(policy.fetch_timeout_s)
    try:
        # Redirects are followed by hand so every hop's scheme is checked (no file:// or other schemes).
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            for _ in range(policy.max_redirects + 1):
                with client.stream("GET", url) as response:
                    if response.status_code not in _REDIRECTS:
                        return _read_body(response, policy, deadline)
                    url = _redirect_target(url, response)
    except httpx.TimeoutException:
        raise _MediaFailure(f"download timed out after {policy.fetch_timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise _MediaFailure(f"download failed: {type(exc).__name__}: {exc}") from None
    raise _MediaFailure(f"more than {policy.max_redirects} redirects")


def _redirect_target(url: str, response: httpx.Response) -> str:
    location = response.headers.get("location")
    if not location:
        raise _MediaFailure(f"HTTP {response.status_code} redirect without a Location header")
    target = urljoin(url, location)
    if urlsplit(target).scheme.lower() not in ("http", "https"):
        raise _MediaFailure(f"redirect to a non-http URL refused ({shorten_url(target)})")
    return target


def _read_body(response: httpx.Response, policy: MediaPolicy, deadline: float) -> bytes:
    if response.status_code != 200:
        raise _MediaFailure(f"HTTP {response.status_code} from server")
    cap = policy.max_image_bytes
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise _MediaFailure(f"image is larger than the {cap} byte limit ({declared} bytes declared)")
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > cap:
            raise _MediaFailure(f"image is larger than the {cap} byte limit")
        # httpx timeouts are per read; a slow drip of bytes must still end at the deadline.
        if time.monotonic() > deadline:
            raise _MediaFailure(f"download timed out after {policy.fetch_timeout_s:g} s")
    return bytes(body)


def _decode(data: bytes, policy: MediaPolicy) -> Image.Image:
    if not data:
        raise _MediaFailure("image is empty")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > policy.max_image_pixels:
            raise _MediaFailure(f"image is {width}x{height} pixels, more than the {policy.max_image_pixels} pixel limit")
        image.load()
        # InternVL and Qwen-VL both decode with `.convert("RGB")` (alpha dropped, palette expanded).
        return image.convert("RGB")
    except _MediaFailure:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _MediaFailure(f"not a decodable image ({type(exc).__name__}: {exc})") from None
