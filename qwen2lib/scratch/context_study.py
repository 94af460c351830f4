"""What long-context settings buy: perplexity past the training length, per method (notebook 07).

Each method is a set of config.json overrides made by the same parser as ``--dca`` / ``--yarn``
(``qwen2lib.model.long_context``), run on the teaching model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from ..model.long_context import apply_overrides, long_context_overrides
from ..model.model_config import Qwen2Args
from .model import Qwen2

METHODS = ("plain RoPE", "YaRN", "DCA", "DCA+YaRN")


def method_overrides(config: dict, train_length: int, max_length: int, chunk_size: int, local_size: int) -> dict:
    """{method: config.json overrides}, built by the same parser as --dca / --yarn. YaRN stretches the trained
    length to ``max_length`` (factor max_length / train_length); DCA keeps every distance within ``chunk_size``."""
    yarn = f"{max_length / train_length:g},{train_length}"
    dca = f"{chunk_size},{local_size},{train_length}"
    return {"plain RoPE": {}, "YaRN": long_context_overrides(None, yarn, config),
            "DCA": long_context_overrides(dca, None, config), "DCA+YaRN": long_context_overrides(dca, yarn, config)}


def load_variants(folder, overrides: dict) -> dict:
    """{method: qwen2lib.scratch.model.Qwen2} sharing one checkpoint's weight tensors (one model's memory for all), each
    with its config.json overrides.

    The teaching model, not the package: its DCA runs the package's own code (``dual_chunk.py``) on blocks of
    queries (memory O(L x chunk)), where the package holds three (L x L) score matrices per layer at once. Both
    read the same config and are tested equal (tests/test_long_context.py).
    """
    base = Qwen2.from_checkpoint(folder).eval()
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    variants = {}
    for method, extra in overrides.items():
        variants[method] = Qwen2.sharing_weights(base, Qwen2Args.from_config_dict(apply_overrides(config, extra)))
    return variants


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """Next-token NLL (L - 1,) of one sequence ids (L,), the LM head run ``rows`` positions at a time: 8k positions
    of 151,936 logits would be 5 GB at once."""
    ids = ids.flatten()
    hidden = model.hidden_states(ids[None])[0]  # (L, D)
    out = []
    for start in range(0, len(ids) - 1, rows):
        end = min(start + rows, len(ids) - 1)
        logits = model.lm_head(hidden[start:end]).float()  # (n, V)
        out.append(F.cross_entropy(logits, ids[start + 1 : end + 1], reduction="none"))
    return torch.cat(out)


def context_perplexity(models: dict, blocks: torch.Tensor, lengths) -> pd.DataFrame:
    """Perplexity at each context length L, per method: blocks (N, >= max(lengths)) of held-out token ids.

    The YaRN paper's protocol: documents of at least L tokens, truncated to their first L. Causal attention makes
    the first L tokens' scores the same whether or not more tokens follow, so one forward over max(lengths) tokens
    per block gives every L. ``ppl`` averages positions 1..L-1; ``ppl new half`` only L/2..L-1, the positions
    that context L adds (past the training length, the ones a position scheme has to get right).
    """
    lengths = sorted(int(n) for n in lengths)
    rows = []
    for method, model in models.items():
        nll = torch.stack([token_nll(model, block[: lengths[-1]]) for block in blocks])  # (N, max - 1)
        for length in lengths:
            window = nll[:, : length - 1]  # token t is predicted from tokens 0..t-1
            rows.append({"method": method, "context": length, "ppl": math.exp(window.mean().item()),
                         "ppl new half": math.exp(window[:, length // 2 - 1 :].mean().item()),
                         "tokens": window.numel()})
    return pd.DataFrame(rows)
