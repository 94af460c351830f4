"""The embedded default models, built on first use into the cache.

``tiny-random``: the tiny architecture with seeded random weights, built in seconds (unit tests).
``tiny``: the same architecture trained on the Python standard library's sources (``train_tiny``), shipped with
the package in compact form (``tiny_shipped/``) and expanded on first use into a normal transformers checkpoint
(``tiny_shipping`` writes that file; this module only reads it, so using ``tiny`` loads no trainer).

Why the compact form is exact: training gives the most frequent tokens their own embedding rows and makes every
other vocabulary id share one of a few dozen band rows (``train_tiny``'s docstring), so only ~4,100 of the 151,936
rows differ. ``tiny.safetensors`` holds those distinct rows (``slot_table``), which of them each vocabulary id uses
(``slot_of``) and the decoder layers under their checkpoint names: a few MB where the checkpoint is 82. Expanding is
one gather, ``slot_table[slot_of]``, and writes the same tensors the training saved. ``model_card.json`` beside it
says how the file was made (corpus sha256, recipe and its hash, loss curve) and what it measures.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ..artifacts import atomic_dir
from ..paths import cache_root
from .random_weights import build_random_model
from .registry import resolve
from .tokenizer import TOKENIZER_FILES, cached_family_tokenizer_dir, load_tokenizer

# Bump when the architecture changes: old tiny-random caches are then rebuilt. (The trained tiny's cache folder is
# named after the shipped file's sha256, so a new file is expanded anew without a bump.)
TINY_RECIPE = "v5"

SHIPPED_DIR = Path(__file__).resolve().parent / "tiny_shipped"
WEIGHTS_FILE = "tiny.safetensors"
CARD_FILE = "model_card.json"
CONFIG_FILES = ("config.json", "generation_config.json")  # the trained checkpoint's own, shipped verbatim
EMBEDDING = "model.embed_tokens.weight"
COMPACT_FORMAT = "qwen2lib-tiny-compact-1"
# Held-out token ids the card stores with the perplexity the trained model gave them: an expansion is checked
# against that exact number, on any machine (the held-out files themselves differ between CPython releases).
CHECK_BLOCKS, CHECK_BLOCK_LEN = 2, 64


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
    """Folder of the embedded model, building it first if the cache lacks it (``tiny``: from the shipped file)."""
    name = f"tiny-{shipped_card()['shipped']['sha256'][:12]}" if trained else f"tiny-random-{TINY_RECIPE}"
    folder = cache_root() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    with _build_lock(name):
        if (folder / "config.json").is_file():  # another process built it while we waited
            return folder
        with atomic_dir(folder) as tmp:
            if trained:
                build_tiny(tmp)
            else:
                build_tiny_random(tmp)
    return folder


# ---- the shipped file ------------------------------------------------------------------------------------

def shipped_card(folder: Path = SHIPPED_DIR) -> dict:
    """The shipped model's card: how it was trained, what it measures, and the sha256 of ``tiny.safetensors``."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkout or the installed package lacks the shipped 'tiny' "
                                "(reinstall, or rebuild it with `qwen2lib train-tiny --write-shipped`)")
    return json.loads(path.read_text(encoding="utf-8"))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def compact_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A trained tiny's tensors -> the compact form: the distinct embedding rows (``slot_table``, (S, D)), the row
    each vocabulary id uses (``slot_of``, (V,) int16) and every other tensor as it is (the tied head is the
    embedding)."""
    table, slot_of = torch.unique(state[EMBEDDING], dim=0, return_inverse=True)  # rows sorted: deterministic
    if table.shape[0] > torch.iinfo(torch.int16).max:
        raise ValueError(f"{table.shape[0]:,} distinct embedding rows: not a model trained with shared band rows "
                         "(train_tiny), so there is nothing to compact")
    compact = {k: v.contiguous() for k, v in state.items() if k not in (EMBEDDING, "lm_head.weight")}
    compact["slot_table"] = table.contiguous()
    compact["slot_of"] = slot_of.to(torch.int16)
    return compact


def expand_state(compact: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The compact form -> the checkpoint's tensors: every vocabulary id's row gathered from the slot table."""
    state = {k: v for k, v in compact.items() if k not in ("slot_table", "slot_of")}
    state[EMBEDDING] = compact["slot_table"][compact["slot_of"].long()]  # (V, D)
    return state


def build_tiny(out_dir: Path, folder: Path = SHIPPED_DIR) -> None:
    """Expand the shipped compact file into ``out_dir``: a transformers checkpoint with tokenizer and card.

    The file's sha256 is checked against the card first: a Git LFS pointer or a truncated checkout fails here, in
    one line, instead of as an unreadable checkpoint later.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    card = shipped_card(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file() or file_sha256(weights) != card["shipped"]["sha256"]:
        raise ValueError(f"{weights} is missing or not the file its {CARD_FILE} describes (sha256 "
                         f"{card['shipped']['sha256'][:12]}...): restore it from git (`git lfs pull` if it is a "
                         "pointer)")
    save_file(expand_state(load_file(weights)), out_dir / "model.safetensors", metadata={"format": "pt"})
    for name in CONFIG_FILES:
        shutil.copyfile(folder / name, out_dir / name)
    spec = resolve("tiny")
    tokenizer_dir = cached_family_tokenizer_dir(spec.tokenizer_family, spec.instruct)
    for name in TOKENIZER_FILES:  # copied, not loaded and saved: loading the 18 MB tokenizer.json takes seconds
        if name not in CONFIG_FILES and (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out_dir / name)
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def check_perplexity(checkpoint: Path, ids: torch.Tensor) -> float:
    """Full-vocabulary perplexity of the checkpoint on (N, T) ids (the card's expansion check)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item())
