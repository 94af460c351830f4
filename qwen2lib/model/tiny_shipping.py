"""Write the shipped ``tiny``: the compact file and its model card in ``qwen2lib/model/tiny_shipped/``.

``qwen2lib train-tiny --write-shipped`` runs ``write_shipped``: the full ``train_tiny`` recipe (minutes), then
``ship_checkpoint``, which checks that the compact form expands into exactly the trained tensors before it replaces
the shipped files. Reading them back is ``tiny.build_tiny``'s (no trainer imported there).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from .corpus import heldout_token_blocks
from .tiny import (CARD_FILE, CHECK_BLOCK_LEN, CHECK_BLOCKS, COMPACT_FORMAT, CONFIG_FILES, SHIPPED_DIR, WEIGHTS_FILE,
                   check_perplexity, compact_state, expand_state, file_sha256)
from .tokenizer import load_tokenizer
from .train_tiny import heldout_perplexity, recipe_hash, recipe_with, train_tiny


def ship_checkpoint(checkpoint: Path, folder: Path = SHIPPED_DIR, extra: dict | None = None) -> dict:
    """Write a ``train_tiny`` checkpoint (with its ``model_card.json``) into ``folder`` in compact form; the card.

    The compact form is checked to expand into exactly the checkpoint's tensors before anything is written; the
    files are replaced one by one, each complete, the card last (it names the weights' sha256).
    """
    checkpoint, folder = Path(checkpoint), Path(folder)
    state = load_file(checkpoint / "model.safetensors")
    compact = compact_state(state)
    expanded, wanted = expand_state(compact), {k: v for k, v in state.items() if k != "lm_head.weight"}
    if expanded.keys() != wanted.keys() or not all(expanded[k].shape == v.shape and torch.equal(expanded[k], v)
                                                   for k, v in wanted.items()):
        raise AssertionError(f"the compact form of {checkpoint} does not expand into the same tensors")
    card = json.loads((checkpoint / CARD_FILE).read_text(encoding="utf-8")) | dict(extra or {})
    ids = heldout_token_blocks(load_tokenizer("tiny"), CHECK_BLOCKS, CHECK_BLOCK_LEN)  # (N, T)
    card["expansion_check"] = {"token_ids": ids.tolist(), "perplexity": check_perplexity(checkpoint, ids)}
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".writing-") as tmp:
        tmp = Path(tmp)
        save_file(compact, tmp / WEIGHTS_FILE, metadata={"format": COMPACT_FORMAT, "recipe_hash": card["recipe_hash"]})
        card["shipped"] = {"file": WEIGHTS_FILE, "format": COMPACT_FORMAT, "bytes": (tmp / WEIGHTS_FILE).stat().st_size,
                           "sha256": file_sha256(tmp / WEIGHTS_FILE),
                           "distinct_embedding_rows": compact["slot_table"].shape[0]}
        for name in CONFIG_FILES:
            shutil.copyfile(checkpoint / name, tmp / name)
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        for name in (WEIGHTS_FILE, *CONFIG_FILES, CARD_FILE):
            os.replace(tmp / name, folder / name)
    return card


def heldout_perplexities(checkpoint: Path, card: dict) -> dict:
    """The card's held-out perplexities: the stdlib files the training never saw (the training's own figure) and,
    for contrast, English prose it never saw either (held-out packages' READMEs), both full-vocabulary."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    recipe, tokenizer = card["recipe"], load_tokenizer("tiny")
    prose = heldout_token_blocks(tokenizer, recipe["heldout_blocks"], recipe["heldout_block_len"], text="prose")
    shape = f"{recipe['heldout_blocks']} blocks of {recipe['heldout_block_len']} tokens"
    return {f"stdlib held-out files, {shape}": card["heldout_perplexity"],
            f"held-out packages' READMEs (prose), {shape}": heldout_perplexity(model, prose)}


def write_shipped(folder: Path = SHIPPED_DIR, *, progress: bool = True) -> dict:
    """Retrain ``tiny`` by ``train_tiny.RECIPE`` in full (minutes) and rewrite the shipped file and card; the card."""
    expected = recipe_hash(recipe_with({}))
    with tempfile.TemporaryDirectory(prefix="qwen2lib-train-tiny-") as tmp:
        card = train_tiny(Path(tmp), progress=progress)
        if card["recipe_hash"] != expected:  # the hash reads the source at the end: it must be what ran
            raise RuntimeError("qwen2lib/model/train_tiny.py changed while it trained: run it again")
        print(f"[qwen2lib] trained tiny: held-out perplexity {card['heldout_perplexity']:.1f}; writing {folder}",
              file=sys.stderr, flush=True)
        return ship_checkpoint(Path(tmp), folder, {"heldout_perplexities": heldout_perplexities(Path(tmp), card)})
