"""`vlmbuild download`: fetch a recipe's checkpoint into `workdir/hf` and apply known per-repo fixes.

Completeness contract for later steps: `workdir/hf` exists only once a download finished. Files
are fetched into the sibling `workdir/.hf.partial`, kept on failure so a re-run skips the files
that already landed (a cut transfer resumes with an HTTP Range request: within the run on
huggingface_hub >= 1.0, on the re-run before that, which keeps `*.incomplete` files), and the directory is renamed to `workdir/hf` after its
`manifest.json` (kind "hf-checkpoint": repo, revision, commit, files, fixes) was written. So both
"`hf/manifest.json` exists" and "`hf/config.json` exists" mean complete; `read_manifest(dir,
HF_MANIFEST_KIND)` is the check that also says which repo and commit it is.

Endpoint and token: `HF_ENDPOINT` is read here at call time and passed on explicitly, because
huggingface_hub freezes `constants.ENDPOINT` when it is imported; `HF_TOKEN` is left to
huggingface_hub, which reads it on every request (`get_token()`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from tqdm import tqdm

from vlmbuild.errors import ConfigError, DownloadError, ToolMissingError, VlmbuildError
from vlmbuild.fsutil import promote_dir
from vlmbuild.manifest import MANIFEST, read_manifest, write_manifest
from vlmbuild.recipe import Recipe
from vlmbuild.tiktoken_hf import tiktoken_to_tokenizer_json

log = logging.getLogger(__name__)

HF_DIR = "hf"
HF_MANIFEST_KIND = "hf-checkpoint"


def model_dir(workdir: str | Path) -> Path:
    """Where `download` puts the checkpoint of `workdir` (complete iff it exists, see module doc)."""
    return Path(workdir) / HF_DIR


def _partial_dir(workdir: Path) -> Path:
    return workdir / f".{HF_DIR}.partial"


# --- known fixes, as data --------------------------------------------------------------------


@dataclass(frozen=True)
class FetchFileFix:
    """The repo lacks `filename`; a compatible copy lives in another repo."""

    filename: str
    from_repo: str
    reason: str
    from_revision: str = "main"

    @property
    def produces(self) -> str:
        return self.filename

    def apply(self, model: Path, endpoint: str | None) -> None:
        from huggingface_hub import hf_hub_download

        hf_hub_download(self.from_repo, self.filename, revision=self.from_revision, local_dir=model, endpoint=endpoint)

    def describe(self) -> str:
        return f"{self.filename} from {self.from_repo}@{self.from_revision} ({self.reason})"


@dataclass(frozen=True)
class ConvertFix:
    """The repo lacks `produces`; `convert(model_dir)` writes it from files the repo has.

    Extension point: Qwen-VL-Chat ships `qwen.tiktoken` but no `tokenizer.json`; the module that
    converts it registers `ConvertFix("tokenizer.json", <its callable>, reason)` for "Qwen/Qwen-VL-Chat"
    with `register_fix`.
    """

    produces: str
    convert: Callable[[Path], None]
    reason: str

    def apply(self, model: Path, endpoint: str | None) -> None:
        self.convert(model)

    def describe(self) -> str:
        return f"{self.produces} by {getattr(self.convert, '__qualname__', 'converter')} ({self.reason})"


Fix = FetchFileFix | ConvertFix

KNOWN_FIXES: dict[str, list[Fix]] = {
    # GRPS docs/internvl2.md: the 1B repo has vocab.json/merges.txt but no fast-tokenizer file;
    # its LLM is Qwen2-0.5B-Instruct, whose tokenizer.json matches.
    "OpenGVLab/InternVL2-1B": [
        FetchFileFix("tokenizer.json", "Qwen/Qwen2-0.5B-Instruct", reason="the InternVL2-1B repo ships none"),
    ],
    # Only the tiktoken form (qwen.tiktoken + remote code) is published; fast-tokenizer readers need tokenizer.json.
    "Qwen/Qwen-VL-Chat": [
        ConvertFix("tokenizer.json", tiktoken_to_tokenizer_json, reason="the Qwen-VL-Chat repo ships only qwen.tiktoken"),
    ],
}


def register_fix(repo: str, fix: Fix) -> None:
    """Add a fix for `repo` (applied when the repo's file list lacks `fix.produces`)."""
    KNOWN_FIXES.setdefault(repo, []).append(fix)


def _needed_fixes(repo: str, files: list[str]) -> list[Fix]:
    return [fix for fix in KNOWN_FIXES.get(repo, []) if fix.produces not in files]


# --- public entry point ----------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What a source fetched into the partial directory."""

    commit: str
    files: list[str]


def download(recipe: Recipe, workdir: str | Path, revision: str | None = None, source: str = "huggingface",
             *, show_progress: bool = True) -> Path:
    """Fetch `recipe.hf_repo` at `revision` (default: the recipe's) into `workdir/hf`; return that directory."""
    if recipe.hf_repo is None:
        raise ConfigError(f"recipe '{recipe.name}' has no hf_repo: it describes a synthetic checkpoint",
                          hint=f"make one with `vlmbuild synth {recipe.name} --output-dir DIR`")
    if source not in _SOURCES:
        raise ConfigError(f"unknown download source '{source}'", hint=f"choose one of: {', '.join(_SOURCES)}")
    workdir = Path(workdir)
    repo, rev = recipe.hf_repo, revision or recipe.revision
    target = model_dir(workdir)
    with _hub_errors(repo, rev):
        fetch = _SOURCES[source](repo, rev)
        if fetch.commit is not None and _is_current(target, repo, fetch.commit):
            log.info("%s@%s (%s) is already complete in %s", repo, rev, fetch.commit, target)
            return target
        partial = _partial_dir(workdir)
        _seed_from_previous(target, partial)
        snap, fixes = _fetch_and_fix(fetch, repo, partial, show_progress)
    produced = [fix.produces for fix in fixes]
    _check_landed(partial, snap.files + produced, repo, rev)
    write_manifest(partial, HF_MANIFEST_KIND, repo=repo, revision=rev, commit=snap.commit, source=source,
                   files=sorted(set(snap.files + produced)), fixes=[fix.describe() for fix in fixes])
    promote_dir(partial, target)
    return target


def _fetch_and_fix(fetch: "_Fetch", repo: str, partial: Path, show_progress: bool) -> tuple[Snapshot, list[Fix]]:
    with Progress(console=Console(stderr=True), disable=not show_progress) as progress:
        snap = fetch.run(partial, progress)
        fixes = _needed_fixes(repo, snap.files)
        for fix in fixes:
            fix.apply(partial, _endpoint())
            log.info("%s: applied fix: %s", repo, fix.describe())
            progress.console.print(f"{repo}: applied fix: {fix.describe()}")
    return snap, fixes


def _is_current(target: Path, repo: str, commit: str) -> bool:
    try:
        data = read_manifest(target, HF_MANIFEST_KIND).data
    except (VlmbuildError, ValueError):  # absent, other kind, or unreadable: not current
        return False
    same = data.get("repo") == repo and data.get("commit") == commit
    return same and all((target / f).is_file() for f in data.get("files", []))


def _seed_from_previous(target: Path, partial: Path) -> None:
    """Start an update from the previous complete download so unchanged files are not fetched again.

    Payload files are hard-linked (the client replaces files by rename, never writes into them);
    its metadata (`.cache/huggingface/`, `.huggingface/` before hub 0.24) is copied because it is
    rewritten in place.
    """
    if partial.exists() or not target.is_dir():
        return

    def link_or_copy(src: str, dst: str) -> None:
        if Path(src).relative_to(target).parts[0].startswith("."):
            shutil.copy2(src, dst)
        else:
            os.link(src, dst)

    try:
        shutil.copytree(target, partial, copy_function=link_or_copy, ignore=shutil.ignore_patterns(MANIFEST))
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)  # e.g. no hard links here: fetch everything


def _check_landed(partial: Path, files: list[str], repo: str, rev: str) -> None:
    missing = [f for f in files if not (partial / f).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DownloadError(f"download of {repo}@{rev} is incomplete: {shown} missing",
                            hint="the hub could not be reached for every file; re-run to resume")


# --- sources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fetch:
    """A resolved download: `commit` when known before fetching (enables the up-to-date check)."""

    commit: str | None
    run: Callable[[Path, Progress], Snapshot]


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def _huggingface(repo: str, rev: str) -> _Fetch:
    from huggingface_hub import HfApi, snapshot_download

    endpoint = _endpoint()
    info = HfApi(endpoint=endpoint).model_info(repo, revision=rev)
    files = sorted(s.rfilename for s in info.siblings or [])

    def run(partial: Path, progress: Progress) -> Snapshot:
        # Pinning the commit keeps the listing and every file of one snapshot, even if the branch moves.
        snapshot_download(repo, revision=info.sha, local_dir=partial, endpoint=endpoint,
                          tqdm_class=_rich_tqdm(progress))
        return Snapshot(commit=info.sha, files=files)

    return _Fetch(commit=info.sha, run=run)


def _modelscope(repo: str, rev: str) -> _Fetch:
    if importlib.util.find_spec("modelscope") is None:
        raise ToolMissingError("the modelscope source needs the modelscope package", hint="pip install modelscope")

    def run(partial: Path, progress: Progress) -> Snapshot:
        from modelscope import snapshot_download

        snapshot_download(repo, revision=rev, local_dir=str(partial))
        files = sorted(str(p.relative_to(partial)) for p in partial.rglob("*")
                       if p.is_file() and not p.relative_to(partial).parts[0].startswith("."))
        return Snapshot(commit=rev, files=files)

    return _Fetch(commit=None, run=run)


_SOURCES: dict[str, Callable[[str, str], _Fetch]] = {"huggingface": _huggingface, "modelscope": _modelscope}


# --- progress and errors ---------------------------------------------------------------------


def _rich_tqdm(progress: Progress) -> type[tqdm]:
    """A tqdm class drawing into one shared rich Progress (huggingface_hub opens several bars at once)."""

    class RichTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)  # huggingface_hub's own tqdm keyword
            super().__init__(*args, **{**kwargs, "gui": True, "disable": False})
            self._task = progress.add_task(self.desc or "", total=self.total, completed=self.n)

        def display(self, *args, **kwargs) -> None:
            if hasattr(self, "_task"):
                progress.update(self._task, completed=self.n, total=self.total, description=self.desc or "")

        def clear(self, *args, **kwargs) -> None:
            pass

        def close(self) -> None:
            self.display()
            super().close()

    return RichTqdm


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport errors of the installed client stack (requests for hub <1.0, httpx2/httpx after)."""
    found: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        if importlib.util.find_spec(module) is not None:
            found.append(__import__(module).HTTPError)
    return tuple(found)


@contextmanager
def _hub_errors(repo: str, rev: str) -> Iterator[None]:
    """Turn huggingface_hub and transport errors into one-line DownloadErrors."""
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                       RevisionNotFoundError)

    endpoint = _endpoint() or "https://huggingface.co"
    where = f"{repo}@{rev} from {endpoint}"
    try:
        yield
    except VlmbuildError:
        raise
    except GatedRepoError as err:
        raise DownloadError(f"{where}: the repo is gated (HTTP {_status(err)})",
                            hint=f"accept its licence at {endpoint}/{repo}, then set HF_TOKEN to a token of that account") from err
    except RepositoryNotFoundError as err:
        raise DownloadError(f"{where}: repo not found or not accessible (HTTP {_status(err)})",
                            hint="check the repo id; private repos need HF_TOKEN; a mirror in HF_ENDPOINT must host it") from err
    except RevisionNotFoundError as err:
        raise DownloadError(f"{where}: no such revision (HTTP {_status(err)})", hint="check --revision") from err
    except EntryNotFoundError as err:
        raise DownloadError(f"{where}: a listed file is missing on the server (HTTP {_status(err)})",
                            hint="check HF_ENDPOINT serves complete repos") from err
    except HfHubHTTPError as err:
        raise DownloadError(f"{where}: HTTP {_status(err)}",
                            hint="retry later, files already fetched are kept; check HF_ENDPOINT and HF_TOKEN") from err
    except _network_errors() as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DownloadError(f"{where}: {type(err).__name__}: {first}",
                            hint="check the network and HF_ENDPOINT; re-run to resume") from err


def _status(err: Exception) -> str:
    response = getattr(err, "response", None)
    return str(getattr(response, "status_code", "?"))
