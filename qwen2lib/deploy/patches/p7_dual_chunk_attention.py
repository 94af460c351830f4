"""Patch 7: dual chunk attention (not yet)."""
from __future__ import annotations

from ..patch import Patch


def dual_chunk_attention_patch() -> Patch:
    # TODO(issue 4, patch 6): route attention through qwen2lib/dca.py's dual_chunk_attention when
    # config.dual_chunk_attention_config is set. Not written yet.
    raise NotImplementedError(
        "patch 6 (dual chunk attention) is not written yet; build the package with dual_chunk_attention=False"
    )


