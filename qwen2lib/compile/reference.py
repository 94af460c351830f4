"""The reference a compiled graph is checked against, and the tokens it is checked on: the stage-level loading
``verify.py``'s pure checks take as arguments.

``verify_tokens``: held-out text (or seeded random ids for a toy vocabulary); ``streamed_reference``: the deploy
package run one decoder layer at a time; ``load_reference``: the whole torch model, for checks that need its modules.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..deploy import load_deploy_package
from ..deploy.layerwise import LayerwiseModel
from ..evaluation.fidelity import logits_fn
from ..model.corpus import heldout_token_blocks
from ..model.loading import load_model
from ..model.tokenizer import load_tokenizer


def verify_tokens(folder: Path, vocab_size: int, n_blocks: int, block_tokens: int, seed: int,
                  text: str = "code") -> tuple[torch.Tensor, str]:
    """(n_blocks, block_tokens) token ids and what they are: held-out text (``qwen2lib.model.corpus``: standard
    library files the tiny model never trained on, or held-out package READMEs for a general model) when the folder
    has a tokenizer that fits the vocabulary, else seeded random ids (test checkpoints with a toy vocabulary)."""
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        ids = heldout_token_blocks(load_tokenizer(str(folder)), n_blocks, block_tokens, seed=seed, text=text)
        if int(ids.max()) < vocab_size:
            return ids, ("held-out Python stdlib files" if text == "code" else "held-out package READMEs") + \
                " (qwen2lib.model.corpus)"
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n_blocks, block_tokens), generator=gen), f"random token ids (seed {seed})"


def streamed_reference(folder: Path, say: str | bool = False):
    """ids -> fp32 logits of the reference without holding it whole: a deploy package runs one decoder layer at a
    time (``qwen2lib.deploy.layerwise``); a raw checkpoint (``source.package: checkpoint``) is loaded whole."""
    if (folder / "patches.json").is_file():
        if say:
            print(f"{say} torch fp32 reference streamed layer by layer from {folder}", flush=True)
        return LayerwiseModel(folder).logits_fn()
    return logits_fn(load_reference(folder))


def load_reference(folder: Path):
    """The torch fp32 reference a graph is checked against: the deploy package it was built from (its code
    checked first), or the plain transformers model of a raw checkpoint."""
    if (folder / "patches.json").is_file():
        model = load_deploy_package(folder, torch.float32)
        model.config.insert_slice = False  # the reference scores every position; a sliced graph is walked per step
        return model
    return load_model(str(folder), dtype=torch.float32)
