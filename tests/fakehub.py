"""A tiny Hugging Face Hub on 127.0.0.1 that `huggingface_hub` can download from for real.

Speaks the endpoints `snapshot_download` / `hf_hub_download` use (read from huggingface_hub 2.4
`hf_api.py`, `file_download.py`, `_snapshot_download.py`; the same routes exist in 0.23):
  GET  /api/models/{repo}[/revision/{rev}]     model_info: {"id", "sha", "siblings": [{"rfilename"}]}
  GET  /api/models/{repo}/tree/{rev}           list_repo_tree: [{"type", "path", "size", "oid", "lfs"?}]
  HEAD|GET /{repo}/resolve/{rev}/{file}       X-Repo-Commit + ETag (git blob sha1) + Content-Length;
                                               LFS files 302 to /cdn/{sha256} with X-Linked-Etag/-Size,
                                               as the real Hub does
  GET  /cdn/{sha256}                           the LFS payload; honours `Range: bytes=N-` (206)
No Xet headers (`X-Xet-Hash`) are ever sent, so the client uses plain HTTP downloads.
Errors carry the Hub's `X-Error-Code` so the client raises its typed errors.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = (
    ("info", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")),
    ("tree", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/.*)?$")),
    ("resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")),
    ("cdn", re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")),
)


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = "1" * 40
    gated: bool = False

    def lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Faults:
    """Injected failures, keyed by file name (GET only, so HEAD-time backoff never slows a test)."""

    get_status: dict[str, int] = field(default_factory=dict)
    """Answer GET of this file with this HTTP status."""
    truncate_once: set[str] = field(default_factory=set)
    """First GET of this file sends half the body, then drops the connection."""
    api_status: int | None = None
    """Answer model_info / tree with this HTTP status."""


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Context manager: serves `repos` on a free port; `url` is the HF_ENDPOINT to use."""

    def __init__(self, repos: dict[str, FakeRepo], lifetime_s: float = 60.0):
        self.repos = repos
        self.faults = Faults()
        self.seen: list[Seen] = []
        self.served: list[str] = []
        self._lifetime_s = lifetime_s
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        # Bounded: a test that forgets to exit cannot leave the server running.
        self._watchdog = threading.Timer(self._lifetime_s, self._server.shutdown)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._watchdog.cancel()
        self._server.shutdown()
        self._server.server_close()

    def gets(self, filename: str) -> int:
        """Times the bytes of `filename` were sent (GET of the file or of its CDN blob, ranged or not)."""
        return self.served.count(filename)

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.seen.append(Seen(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
            for name, pattern in _ROUTES:
                match = pattern.match(path)
                if match:
                    getattr(self, f"_{name}")(body=body, **match.groupdict())
                    return
            self._error(404, "EntryNotFound", body)

        def _repo(self, repo: str, rev: str | None, body: bool) -> FakeRepo | None:
            found = hub.repos.get(repo)
            if found is None:
                self._error(404, "RepoNotFound", body)
            elif found.gated:
                self._error(403, "GatedRepo", body)
            elif rev not in (None, "main", found.commit):
                self._error(404, "RevisionNotFound", body)
            else:
                return found
            return None

        def _info(self, repo: str, rev: str | None, body: bool) -> None:
            if hub.faults.api_status:
                return self._error(hub.faults.api_status, None, body)
            if (found := self._repo(repo, rev, body)) is not None:
                siblings = [{"rfilename": n} for n in sorted(found.files)]
                # hub 0.23 requires downloads/likes/tags; 2.x takes whatever is there
                info = {"id": repo, "sha": found.commit, "private": False, "gated": False, "downloads": 0, "likes": 0,
                        "tags": [], "lastModified": "2024-07-01T00:00:00.000Z", "siblings": siblings}
                self._json(info, body)

        def _tree(self, repo: str, rev: str, body: bool) -> None:
            if hub.faults.api_status:
                return self._error(hub.faults.api_status, None, body)
            if (found := self._repo(repo, rev, body)) is None:
                return
            entries = []
            for name, data in sorted(found.files.items()):
                entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
                if found.lfs(name):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            self._json(entries, body)

        def _resolve(self, repo: str, rev: str, file: str, body: bool) -> None:
            if (found := self._repo(repo, rev, body)) is None:
                return
            if file not in found.files:
                return self._error(404, "EntryNotFound", body, {"X-Repo-Commit": found.commit})
            data = found.files[file]
            if found.lfs(file):
                sha = hashlib.sha256(data).hexdigest()
                # Like the Hub: LFS metadata rides on the redirect; the CDN answers the same HEAD fields.
                headers = {"X-Repo-Commit": found.commit, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                           "Location": f"{hub.url}/cdn/{sha}", "Content-Length": "0"}
                return self._send(302, headers, b"", body)
            headers = {"X-Repo-Commit": found.commit, "ETag": f'"{git_blob_sha1(data)}"'}
            self._payload(file, data, headers, body)

        def _cdn(self, sha: str, body: bool) -> None:
            for found in hub.repos.values():
                for name, data in found.files.items():
                    if hashlib.sha256(data).hexdigest() == sha:
                        headers = {"X-Repo-Commit": found.commit, "ETag": f'"{sha}"'}
                        return self._payload(name, data, headers, body)
            self._error(404, "EntryNotFound", body)

        def _payload(self, name: str, data: bytes, headers: dict[str, str], body: bool) -> None:
            if body and name in hub.faults.get_status:
                return self._error(hub.faults.get_status[name], None, body)
            start = _range_start(self.headers.get("Range"))
            if body:
                hub.served.append(name)
            if body and start is None and name in hub.faults.truncate_once:
                hub.faults.truncate_once.discard(name)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True  # the client sees a body cut short and resumes with Range
                return
            if start is not None and body:
                headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
                return self._send(206, headers, data[start:], body)
            self._send(200, headers, data, body)

        def _json(self, obj: object, body: bool) -> None:
            self._send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode(), body)

        def _error(self, status: int, code: str | None, body: bool, extra: dict[str, str] | None = None) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": f"fake hub says {status}", **(extra or {})}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, headers, json.dumps({"error": f"fake hub says {status}"}).encode(), body)

        def _send(self, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
            self.send_response(status)
            headers.setdefault("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


def _range_start(header: str | None) -> int | None:
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(match.group(1)) if match else None


def route_client_to(fake: FakeHub, monkeypatch, cache_dir: Path, token: str | None = None) -> None:
    """Point huggingface_hub at `fake` (endpoint, token, a private cache) and make any lookup of
    another host fail the test, so nothing can reach a real hub."""
    import socket

    import huggingface_hub

    real_getaddrinfo = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        assert host in ("127.0.0.1", "localhost"), f"test tried to reach {host}"
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache_dir))
