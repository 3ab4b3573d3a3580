"""Atomic writes: build into a temporary sibling, rename into place only when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vlmbuild.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_parent_writable(target: Path) -> Path:
    parent = target.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {parent}: {err.strerror}", hint="choose a writable output directory") from err
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent} is not writable", hint="choose a writable output directory")
    return parent


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; on success it replaces `target`.

    On any exception the temporary directory is removed and `target` is left untouched.
    """
    target = Path(target)
    parent = _check_parent_writable(target)
    if target.exists() and not overwrite:
        raise OutputError(f"{target} already exists", hint="remove it or pass --overwrite")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    except OSError as err:
        raise OutputError(f"cannot write in {parent}: {err.strerror}", hint="choose a writable output directory") from err
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; artifacts get ordinary permissions
    try:
        yield tmp
        promote_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def promote_dir(finished: Path, target: Path) -> None:
    """Rename a finished sibling directory to `target`, replacing what was there."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        finished.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        finished.rename(target)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    parent = _check_parent_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    except OSError as err:
        raise OutputError(f"cannot write in {parent}: {err.strerror}", hint="choose a writable output directory") from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
