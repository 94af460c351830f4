"""The deploy package's attention mask (patch 3, eager_attention), copied into it as ``causal_mask_<target>.py``.

transformers builds its masks in ``masking_utils`` (mask functions, vmap, an sdpa fast path); an exporter should see
a handful of plain ops instead: an arange of query positions, one of key positions, ``<=`` and ``>`` comparisons and
a ``torch.where``. Imports only torch and transformers: the package runs where qwen2lib is not installed.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache


def build_causal_mask(
    attention_mask: torch.Tensor | None,
    past_length: int,
    query_length: int,
    key_length: int,
    key_offset: int,
    sliding_window: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Additive mask of shape (batch or 1, 1, query_length, key_length): 0 where a query may look, dtype min elsewhere.

    Query i sits at position past_length + i and key j at key_offset + j (a sliding-window cache may have
    dropped the oldest keys). A query sees the keys at or before its own position, with a sliding window
    only the last `sliding_window` of them, and never a key whose 2D `attention_mask` entry is 0 (padding).
    Built from arange and comparisons so that an exported graph shows the mask, not a library call.
    """
    query_positions = torch.arange(query_length, device=device) + past_length  # (T,)
    key_positions = torch.arange(key_length, device=device) + key_offset  # (L,)
    visible = key_positions[None, :] <= query_positions[:, None]  # (T, L)
    if sliding_window is not None:
        visible = visible & (key_positions[None, :] > query_positions[:, None] - sliding_window)
    visible = visible[None, None, :, :]  # (1, 1, T, L)
    if attention_mask is not None:
        key_is_token = attention_mask[:, key_offset : key_offset + key_length].to(torch.bool)  # (B, L)
        visible = visible & key_is_token[:, None, None, :]  # (B, 1, T, L)
    return torch.where(visible, torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min)


def layer_causal_mask(
    config,
    layer_type: str,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor,
    past_length: int,
    cache: Cache | None,
) -> torch.Tensor:
    """The additive mask every layer of `layer_type` ("full_attention" or "sliding_attention") uses, for new tokens
    inputs_embeds (B, T, D) after past_length cached ones (Qwen2Model.causal_mask_for)."""
    query_length = inputs_embeds.shape[1]
    if cache is not None:
        # A sliding-window Cache returns only its last keys: ask it which positions they are
        key_length, key_offset = cache.get_mask_sizes(query_length, config.layer_types.index(layer_type))
    else:
        key_length, key_offset = past_length + query_length, 0
    sliding_window = config.sliding_window if layer_type == "sliding_attention" else None
    return build_causal_mask(
        attention_mask,
        past_length,
        query_length,
        key_length,
        key_offset,
        sliding_window,
        dtype=inputs_embeds.dtype,
        device=inputs_embeds.device,
    )
