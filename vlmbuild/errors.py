"""One error hierarchy. The CLI prints `str(err)` as one line; the server maps `http_status`."""

from __future__ import annotations


class VlmbuildError(Exception):
    """Base class: message says what was expected, what was found, and what to do next."""

    http_status = 500

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} ({hint})")


class ConfigError(VlmbuildError):
    """A recipe, option or config file is invalid."""

    http_status = 400


class CheckpointError(VlmbuildError):
    """A model directory or checkpoint is missing, incomplete or not what was expected."""


class UnsupportedError(VlmbuildError):
    """An architecture, dtype or feature vlmbuild does not handle."""


class ToolMissingError(VlmbuildError):
    """An optional runtime (tensorrt, tensorrt_llm, a GPU) is not available."""


class OutputError(VlmbuildError):
    """An output location cannot be written."""


class DownloadError(VlmbuildError):
    """Fetching from the model hub failed."""


class ExportError(VlmbuildError):
    """An ONNX export, numeric check or engine build failed."""


class RequestError(VlmbuildError):
    """A client request is invalid (HTTP 400)."""

    http_status = 400

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        self.param = param
        self.code = code
        super().__init__(message)


class ModelNotFoundError(RequestError):
    """The request names a model this server does not serve (HTTP 404)."""

    http_status = 404
