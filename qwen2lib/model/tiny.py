"""The embedded default models, built on first use into the cache.

``tiny-random``: the tiny architecture with seeded random weights, built in seconds (unit tests).
``tiny``: the same architecture trained for a few minutes on the Python standard library's own
sources (``train_tiny``), so perplexity, quantization error and generation mean something.
"""
from __future__ import annotations

import contextlib
import fcntl
import sys
from pathlib import Path

import torch

from ..artifacts import atomic_dir
from ..paths import cache_root
from .random_weights import build_random_model
from .registry import resolve
from .tokenizer import load_tokenizer
from .train_tiny import train_tiny

# Bump when the architecture or the training recipe changes: old caches are then rebuilt.
TINY_RECIPE = "v5"


@contextlib.contextmanager
def _build_lock(name: str):
    """One builder at a time (a notebook run and a test run may start together)."""
    lock_path = cache_root() / "models" / f".{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_tiny_random(out_dir: Path, seed: int = 0) -> None:
    """Seeded random tiny checkpoint with the real tokenizer files beside it."""
    model = build_random_model(resolve("tiny-random"), torch.float32, seed)
    model.save_pretrained(out_dir)
    load_tokenizer("tiny-random").save_pretrained(out_dir)


def tiny_dir(trained: bool = True) -> Path:
    """Folder of the embedded model, building it first if the cache lacks it."""
    name = f"tiny-{TINY_RECIPE}" if trained else f"tiny-random-{TINY_RECIPE}"
    folder = cache_root() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    with _build_lock(name):
        if (folder / "config.json").is_file():  # another process built it while we waited
            return folder
        with atomic_dir(folder) as tmp:
            if trained:
                print(f"[qwen2lib] first use of 'tiny': training it once into {folder} (a few minutes)", file=sys.stderr)
                train_tiny(tmp)
            else:
                build_tiny_random(tmp)
    return folder
