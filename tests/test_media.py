"""Image loading: data URLs, a tiny local HTTP server (ok, oversize, 404, timeout, not an image,
redirects), and `file://` confined to the allowed directory. Every failure is a 400 naming the image."""

from __future__ import annotations

import base64
import io
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from vlmbuild.errors import RequestError
from vlmbuild.serve.media import MediaPolicy, load_image, shorten_url

SEED = random.randrange(2**32)
CAP = 64 * 1024


def png_bytes(mode: str = "RGB", size: tuple[int, int] = (37, 23)) -> tuple[bytes, Image.Image]:
    rng = np.random.default_rng(SEED)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8), mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), image


PNG, PNG_IMAGE = png_bytes()


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {
        "/ok.png": (200, {"Content-Type": "image/png", "Content-Length": str(len(PNG))}, PNG),
        "/text": (200, {"Content-Type": "text/html"}, b"<html>not an image</html>"),
        "/declared-big": (200, {"Content-Length": str(CAP * 10)}, b""),
        "/to-ok": (302, {"Location": "/ok.png"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
    }

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        if self.path == "/slow":
            time.sleep(1.5)  # longer than the test policy's 0.3 s timeout
        if self.path in ("/big", "/slow"):
            # No Content-Length (HTTP/1.0, close-delimited): only the streaming cap can stop it.
            self.send_response(200)
            self.end_headers()
            for _ in range(CAP // 4096 + 4):
                self.wfile.write(b"\0" * 4096)
            return
        status, headers, body = self.routes.get(self.path, (404, {}, b"missing"))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


POLICY = MediaPolicy(fetch_timeout_s=0.3, max_image_bytes=CAP)


def assert_same_pixels(got: Image.Image, ref: Image.Image) -> None:
    assert got.mode == "RGB" and got.size == ref.size
    assert np.array_equal(np.asarray(got), np.asarray(ref.convert("RGB"))), f"seed {SEED}"


def refused(url: str, policy: MediaPolicy = POLICY, index: int = 3) -> str:
    with pytest.raises(RequestError) as info:
        load_image(url, policy, index=index)
    err = info.value
    assert err.http_status == 400 and "\n" not in str(err)
    assert str(err).startswith(f"image {index} ("), str(err)
    return str(err)


def test_http_ok_and_redirect(server):
    assert_same_pixels(load_image(f"{server}/ok.png", POLICY), PNG_IMAGE)
    assert_same_pixels(load_image(f"{server}/to-ok", POLICY), PNG_IMAGE)


@pytest.mark.parametrize(
    "path, words",
    [
        ("/big", "larger than the 65536 byte limit"),
        ("/declared-big", "larger than the 65536 byte limit"),
        ("/missing.png", "HTTP 404"),
        ("/slow", "timed out after 0.3 s"),
        ("/text", "not a decodable image"),
        ("/to-file", "redirect to a non-http URL refused"),
        ("/loop", "more than 3 redirects"),
    ],
)
def test_http_failures(server, path, words):
    started = time.monotonic()
    message = refused(f"{server}{path}")
    assert words in message and path in message, message
    assert time.monotonic() - started < 1.2, "the fetch must stop at the timeout or the cap"


def test_data_urls():
    rgba_bytes, rgba = png_bytes("RGBA")
    b64 = base64.b64encode(rgba_bytes).decode()
    assert_same_pixels(load_image(f"data:image/png;base64,{b64}", POLICY), rgba)
    # Line-wrapped base64 (some clients) still decodes.
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert_same_pixels(load_image(f"data:image/png;base64,{wrapped}", POLICY), rgba)
    assert "only base64" in refused("data:image/png,rawbytes")
    assert "expected image/*" in refused(f"data:text/plain;base64,{b64}")
    assert "invalid base64" in refused("data:image/png;base64,@@@@")
    assert "not a decodable image" in refused("data:image/png;base64," + base64.b64encode(b"hello").decode())
    assert "byte limit" in refused("data:image/png;base64," + "A" * (CAP * 2))
    assert "malformed data URL" in refused("data:image/png;base64")
    message = refused("data:image/png;base64," + base64.b64encode(b"x" * 3000).decode())
    assert "data:image/png;base64,…(" in message and len(message) < 200


def test_pixel_cap():
    data, _ = png_bytes(size=(300, 300))
    policy = MediaPolicy(max_image_pixels=300 * 299)
    assert "pixel limit" in refused("data:image/png;base64," + base64.b64encode(data).decode(), policy)


def test_local_files_only_inside_allowed_dir(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "a b.png").write_bytes(PNG)
    outside = tmp_path / "secret.png"
    outside.write_bytes(PNG)
    (allowed / "link.png").symlink_to(outside)
    policy = MediaPolicy(allowed_local_media_path=allowed, max_image_bytes=CAP)

    assert_same_pixels(load_image((allowed / "a b.png").as_uri(), policy), PNG_IMAGE)
    assert "--allowed-local-media-path" in refused((allowed / "a b.png").as_uri(), MediaPolicy())
    assert "outside the allowed media directory" in refused(outside.as_uri(), policy)
    assert "outside the allowed media directory" in refused(f"file://{allowed}/../secret.png", policy)
    assert "outside the allowed media directory" in refused((allowed / "link.png").as_uri(), policy)
    assert "no such file" in refused((allowed / "nope.png").as_uri(), policy)
    assert "must name a local path" in refused(f"file://otherhost{allowed}/a%20b.png", policy)


def test_unsupported_sources():
    for url in ["/etc/passwd", "ftp://x/y.png", "iVBORw0KGgo="]:
        assert "unsupported URL" in refused(url)
    assert shorten_url("https://example.com/" + "x" * 200).endswith("…")
