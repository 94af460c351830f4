"""Run folders: one per stage under ``workdir``, each written atomically with a ``metrics.json``."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

STAGES = ("patched", "calibration", "quantized", "compiled", "inference")


def default_workdir(model: str) -> Path:
    """``runs/<model>`` with any path separators of a hub id or folder flattened."""
    safe = str(model).rstrip("/").replace("\\", "/").split("/")[-1] or "model"
    return Path("runs") / safe


def stage_dir(workdir: str | os.PathLike, stage: str, *sub: str) -> Path:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return Path(workdir).joinpath(stage, *sub)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final`` in one rename.

    On any exception the temp folder is removed, so an interrupted run leaves no half-written
    artefact and an older complete one stays in place until the new one is whole.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
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
        raise FileNotFoundError(f"{path} does not exist: run the stage that writes {Path(folder).name}/ first")
    return json.loads(path.read_text(encoding="utf-8"))
