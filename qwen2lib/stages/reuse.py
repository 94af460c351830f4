"""The stage graph and its one reuse rule.

    checkpoint -> patched -> calibration -> quantized/<scheme> -> compiled/<config> -> inference
                  patched | quantized/<scheme> -> exported/<format>-<variant> (GGUF, compressed-tensors)

Each stage folder under the run's ``workdir`` is built by ``ensure_stage`` and carries, in its
``metrics.json``, a ``stage`` record:

    key        the request (the stage's own settings), the identity of every input artefact, and a hash of
               each source file that builds the stage
    identity   a fingerprint of this folder's key and contents: the next stage's input identity
    inputs     {input name: {"path", "identity"}}, so any figure traces back to the checkpoint and the code
    files      {file: bytes}, to tell a whole folder from a damaged one

A folder is reused only when its key equals the key asked for now; otherwise it is rebuilt and one line
says why (``patched: rebuilding, code changed: deploy/patches/p3_eager_attention.py``). A change upstream changes that stage's
identity, so everything after it rebuilds too. ``pipeline.ensure`` is the one entry point by stage name.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

from ..artifacts import atomic_dir, read_metrics, write_metrics
from ..model.footprint import check_stage
from ..model.tokenizer import TOKENIZER_FILES
from .closure import import_closure
from .resident import peak_bytes, reset_peak

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the qwen2lib folder
GRAPH = ("checkpoint", "patched", "calibration", "quantized", "compiled", "exported", "inference")
# The modules that build each stage. Its hashed source files are their import closure (``closure.py``), so editing
# any module they can reach rebuilds that stage and what follows it.
STAGE_ENTRIES = {
    # the quantizer modules and the modules the patches' code imports (``Patch.copies``) are copied into the deploy
    # package as files, not imported by the code that copies them
    "patched": ("qwen2lib.deploy.package", "qwen2lib.deploy.quantizer", "qwen2lib.deploy.schemes",
                "qwen2lib.deploy.quantized_package", "qwen2lib.deploy.inserted.causal_mask",
                "qwen2lib.deploy.inserted.kv_cache", "qwen2lib.scratch.dual_chunk"),
    "calibration": ("qwen2lib.calibrate.stage",),
    "quantized": ("qwen2lib.quantize.stage",),
    "compiled": ("qwen2lib.compile.stage",),
    "exported": ("qwen2lib.export.stage",),
}
SMALL_FILE = 1 << 24  # files up to this size are hashed into the identity; larger ones by name and size


def stage_sources(stage: str) -> list[Path]:
    """The source files that build ``stage``: the import closure of its modules."""
    return import_closure(PACKAGE_DIR, STAGE_ENTRIES[stage])


def code_digest(stage: str) -> dict[str, str]:
    """{source file: sha256 prefix} of the files that build ``stage``."""
    root = Path(PACKAGE_DIR).resolve()
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()[:16]
            for f in stage_sources(stage)}


def checkpoint_identity(folder: str | os.PathLike) -> str:
    """A checkpoint's fingerprint: config.json's and the tokenizer files' bytes, and each weight file's name, size
    and mtime (a tokenizer.json added beside vocab.json + merges.txt is a different checkpoint to every stage)."""
    folder = Path(folder)
    h = hashlib.sha256((folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b"")
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            h.update(name.encode() + hashlib.sha256((folder / name).read_bytes()).digest())
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return "ckpt-" + h.hexdigest()[:16]


def identity(folder: str | os.PathLike) -> str:
    """The identity of an artefact: a stage folder's recorded one, else (a checkpoint, a folder given by
    path) its checkpoint fingerprint."""
    folder = Path(folder)
    try:
        record = read_metrics(folder).get("stage") or {}
    except (FileNotFoundError, ValueError):
        record = {}
    return record.get("identity") or checkpoint_identity(folder)


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "metrics.json"}


def _fingerprint(key: dict, folder: Path) -> str:
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
    for name, size in _files(folder).items():
        h.update(f"{name}:{size}".encode())
        path = folder / name
        if size <= SMALL_FILE and not path.is_symlink():
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def _normal(data):
    """JSON round trip: the form a key has once read back from metrics.json."""
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def stage_key(stage: str, request: Mapping, inputs: Mapping[str, str | os.PathLike]) -> dict:
    return _normal({"request": dict(request), "inputs": {n: identity(p) for n, p in inputs.items()},
                    "code": code_digest(stage)})


def why_rebuild(old: dict | None, new: dict) -> str | None:
    """One line saying what differs between the key a folder was built with and the key asked for now."""
    if not old:
        return "building (nothing reusable there)"
    changed = [f for f in new["code"] if old.get("code", {}).get(f) != new["code"][f]]
    if changed:
        return "rebuilding, code changed: " + ", ".join(changed)
    changed = [n for n in new["inputs"] if old.get("inputs", {}).get(n) != new["inputs"][n]]
    if changed:
        return "rebuilding, input changed: " + ", ".join(changed)
    old_req, new_req = old.get("request", {}), new["request"]
    diffs = [f"{k} {old_req.get(k)!r} -> {new_req.get(k)!r}" for k in sorted(set(old_req) | set(new_req))
             if old_req.get(k) != new_req.get(k)]
    if diffs:
        return "rebuilding, request changed: " + "; ".join(diffs)[:300]
    return None


def _reusable(folder: Path, key: dict) -> tuple[bool, str | None]:
    """(reuse?, reason to rebuild)."""
    try:
        record = read_metrics(folder).get("stage") or {}
    except (FileNotFoundError, ValueError):
        return False, "building (nothing reusable there)" if not folder.exists() else "rebuilding, no stage record"
    reason = why_rebuild(record.get("key"), key)
    if reason:
        return False, reason
    damaged = [n for n, size in (record.get("files") or {}).items()
               if not (folder / n).is_file() or (folder / n).stat().st_size != size]
    if damaged:
        return False, f"rebuilding, files damaged or missing: {', '.join(damaged[:3])}"
    return True, None


def recorded_request(folder: str | os.PathLike) -> dict | None:
    """The request a stage folder was built with (None when there is no such folder)."""
    try:
        return (read_metrics(folder).get("stage") or {}).get("key", {}).get("request")
    except (FileNotFoundError, ValueError):
        return None


_peaks_before: list[int] = []  # per stage being built (outermost first): its peak so far, kept across a nested stage's reset


def _start_peak() -> None:
    if _peaks_before:  # a stage built inside another's build: the outer one keeps the peak it had reached
        _peaks_before[-1] = max(_peaks_before[-1], peak_bytes())
    _peaks_before.append(0)
    reset_peak()


def _end_peak() -> int:
    """This stage's peak resident bytes (its nested stages' included)."""
    peak = max(_peaks_before.pop(), peak_bytes())
    if _peaks_before:
        _peaks_before[-1] = max(_peaks_before[-1], peak)
    return peak


def ensure_stage(stage: str, folder: str | os.PathLike, request: Mapping, inputs: Mapping[str, str | os.PathLike],
                 build: Callable[[Path], dict], *, force: bool = False, verbose: bool = True) -> Path:
    """Reuse ``folder`` when its key matches; else run ``build(tmp) -> metrics`` into a temp folder that
    replaces it atomically, and record the stage (key, identity, inputs, files) in its metrics.json."""
    folder = Path(folder)
    key = stage_key(stage, request, inputs)
    reuse, reason = _reusable(folder, key)
    if reuse and not force:
        if verbose:
            print(f"[{stage}] reusing {folder}", file=sys.stderr, flush=True)
        return folder
    check_stage(stage, key["request"], inputs)  # refuse, with the numbers, what this machine cannot hold
    if verbose:
        print(f"[{stage}] {reason or 'rebuilding (forced)'}: {folder}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    _start_peak()
    with atomic_dir(folder) as tmp:
        try:
            metrics = build(tmp) or {}
        finally:
            peak = _end_peak()
        metrics["stage"] = {"name": stage, "key": key, "identity": f"{stage}-{_fingerprint(key, tmp)}",
                            "inputs": {n: {"path": str(Path(p).resolve()), "identity": key["inputs"][n]}
                                       for n, p in inputs.items()},
                            "files": _files(tmp), "wall_s": round(time.perf_counter() - started, 3),
                            "peak_rss_bytes": peak}
        write_metrics(tmp, metrics)
    return folder

