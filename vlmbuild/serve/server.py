"""Run the OpenAI-compatible server: in the foreground (`vlmbuild serve`) or on a background thread
(`vlmbuild demo`, tests)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import uvicorn

from vlmbuild.errors import OutputError
from vlmbuild.serve.app import create_app
from vlmbuild.serve.engine import ChatEngine
from vlmbuild.serve.runtime import ServeOptions, ServingModel


def make_app(workdir: str | Path, options: ServeOptions = ServeOptions(), api_key: str | None = None):
    return create_app(ChatEngine(ServingModel(workdir, options)), api_key=api_key)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(workdir: str | Path, host: str, port: int, options: ServeOptions, api_key: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = make_app(workdir, options, api_key)
    uvicorn.run(app, host=host, port=port, log_level="info")


class BackgroundServer:
    """uvicorn on a daemon thread; `with BackgroundServer(app) as url:` yields the base URL."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise OutputError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
