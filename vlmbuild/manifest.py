"""`manifest.json` next to every artifact: what it is, how it was made, what the next step needs."""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vlmbuild import __version__
from vlmbuild.errors import CheckpointError
from vlmbuild.fsutil import write_json

MANIFEST = "manifest.json"
_TRACKED = ("torch", "transformers", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx_cu12_bindings", "tensorrt_llm", "safetensors")


def tool_versions() -> dict[str, str]:
    """Versions of the tools that shaped an artifact (missing ones are left out)."""
    out = {"vlmbuild": __version__, "python": platform.python_version()}
    for name in _TRACKED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


class Manifest(BaseModel):
    """Typed header shared by all manifests; `data` holds the step-specific payload."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    """Artifact kind: 'trtllm-checkpoint', 'vision', 'llm-engine', 'workdir'."""
    created: float = Field(default_factory=time.time)
    versions: dict[str, str] = Field(default_factory=tool_versions)
    data: dict[str, Any] = Field(default_factory=dict)


def write_manifest(directory: str | Path, kind: str, **data: Any) -> Manifest:
    manifest = Manifest(kind=kind, data=data)
    write_json(Path(directory) / MANIFEST, manifest.model_dump(mode="json"))
    return manifest


def read_manifest(directory: str | Path, kind: str | None = None) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}", hint="build it with vlmbuild first")
    manifest = Manifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    if kind is not None and manifest.kind != kind:
        raise CheckpointError(f"{path} describes a '{manifest.kind}', expected a '{kind}'")
    return manifest

