"""Run folders: one per stage under ``workdir``, each written atomically with a ``metrics.json``.

Every folder ``atomic_dir`` writes carries a marker file (``MARKER``). A folder is only ever replaced when
it carries that marker: a path that names anything else (a user's folder, a checkpoint) is refused, so a
stage can never delete what it did not create. Temp folders are named after the process that owns them;
leftovers of a killed run are swept by the next run once that process is gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import BadInputError, MissingInputError, Qwen2LibError

STAGES = ("patched", "calibration", "quantized", "compiled", "exported", "inference")
MARKER = ".qwen2lib-folder"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-")
_LEGACY_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp-|old-\d+$)")
LEGACY_LEFTOVER_AGE_S = 24 * 3600


class ForeignFolderError(Qwen2LibError, FileExistsError):
    """A stage would replace a folder that qwen2lib did not write."""


CHECKOUT = Path(__file__).resolve().parent.parent


def default_workdir(model: str) -> Path:
    """``runs/<model>`` (any path separators of a hub id or folder flattened), at the top of the workbook's
    checkout, so JupyterLab (whose notebooks run in notebooks/), papermill, the workbook command and the CLI
    all share one run folder; outside a checkout, under the current folder."""
    safe = str(model).rstrip("/").replace("\\", "/").split("/")[-1] or "model"
    root = CHECKOUT if (CHECKOUT / "notebooks").is_dir() and (CHECKOUT / "qwen2lib").is_dir() else Path.cwd()
    return root / "runs" / safe


def stage_dir(workdir: str | os.PathLike, stage: str, *sub: str) -> Path:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    for part in sub:
        check_component(part, f"{stage} sub-folder")
    return Path(workdir).joinpath(stage, *sub)


def check_component(name: str, what: str = "name") -> str:
    """A single, plain path component: no separators, not '.' or '..', not hidden, printable."""
    text = str(name)
    if (not text or text in (".", "..") or text.startswith(".") or "/" in text or "\\" in text
            or not text.isprintable() or len(text) > 128):
        raise BadInputError(f"{what} {text!r} must be one plain folder name (letters, digits, '-', '_', '.'; "
                            "no '/', no leading '.'), e.g. qwen2_int8")
    return text


def is_owned(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was written by ``atomic_dir`` (it carries the marker file)."""
    return (Path(folder) / MARKER).is_file()


def check_replaceable(final: str | os.PathLike) -> None:
    """Refuse (one line, the path named) when ``final`` exists and is not a folder qwen2lib wrote."""
    final = Path(final)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise ForeignFolderError(f"{final} exists and is not a qwen2lib output folder (a file or a link): "
                                 "move it away or choose another name/workdir")
    if final.is_dir() and not is_owned(final) and any(final.iterdir()):
        raise ForeignFolderError(f"{final} exists and was not written by qwen2lib (no {MARKER} marker): refusing "
                                 "to replace it; move it away or choose another name/workdir")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers(parent: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` folders whose process is gone.

    Older unnamed leftovers (``.<name>.tmp-XXXX`` from before temp folders carried a pid) are removed
    once they are a day old: no run takes that long between creating and renaming its folder.
    """
    parent, removed = Path(parent), []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        m = _LEFTOVER.match(entry.name)
        if m and (name is None or m["name"] == name) and not _pid_alive(int(m["pid"])):
            pass
        else:
            legacy = _LEGACY_LEFTOVER.match(entry.name)
            if m or not legacy or (name is not None and legacy["name"] != name):
                continue
            with contextlib.suppress(OSError):
                if time.time() - entry.lstat().st_mtime < LEGACY_LEFTOVER_AGE_S:
                    continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final`` in one rename.

    On any exception the temp folder is removed, so an interrupted run leaves no half-written
    artefact and an older complete one stays in place until the new one is whole. ``final`` is
    replaced only when it is a folder this function wrote (``check_replaceable``).
    """
    final = Path(final)
    check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        (tmp / MARKER).write_text(json.dumps({"written_by": "qwen2lib", "folder": final.name}) + "\n",
                                  encoding="utf-8")
        yield tmp
        check_replaceable(final)  # the world may have changed while the stage ran
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}-", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_metrics(folder: str | os.PathLike, metrics: dict) -> Path:
    """Write ``metrics.json`` (sorted keys, floats as measured) into a stage folder."""
    return atomic_write_text(Path(folder) / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n")


def read_metrics(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist: run the stage that writes {Path(folder).name}/ first")
    return json.loads(path.read_text(encoding="utf-8"))
