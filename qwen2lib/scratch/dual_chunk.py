"""Dual Chunk Attention, its one fast torch formulation: ``dca.py``'s fast path, and (copied by ``qwen2lib.deploy``
into every deploy package as ``dual_chunk_<target>.py``, patch 7) the deploy package's attention.

It suits an eager, exportable model: keys are rotated once at ``p mod s`` (s = chunk_size - local_size) and cached
that way; the query is rotated three times (intra: ``p mod s``, successive: ``min(p mod s + s, chunk_size)``,
inter: ``chunk_size``), giving three score matrices; each (query, key) pair takes the score of its part, chosen by
the chunk indices of the two positions, and one softmax runs over the result with the usual causal/padding mask.
That is exactly the single softmax over the three parts that the reference merges pair by pair
(``dca.naive_dual_chunk_attention``). Inside one chunk every pair is intra and the query rotation equals the plain
one, so the output equals plain attention.

This file imports only torch: a deploy package runs it where qwen2lib is not installed. The last three functions
speak the package's language (a transformers config, its rotary embedding, its attention module); the rest take
plain tensors. Shapes: B batch, H query heads, T new tokens, L keys (cached + new), hd head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DualChunkRotary:
    """What Dual Chunk Attention needs in every layer, computed once per forward by Qwen2Model.

    key: cos/sin of the new tokens at p mod s, the rotation their keys are cached with.
    queries: cos/sin of the new tokens for the intra, successive and inter parts.
    intra, successive: (batch or 1, 1, query_length, key_length) bool, which part each (query, key) pair is in
    (neither: inter). Causality and padding stay in the additive attention mask.
    """

    key: tuple[torch.Tensor, torch.Tensor]
    queries: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    intra: torch.Tensor
    successive: torch.Tensor


# ----------------------------------------------------------------------------- positions


def rotary_positions(positions: torch.Tensor, chunk_size: int, local_size: int):
    """Rotary positions of the tokens at ``positions`` (any shape, int64): (key, (intra, successive, inter) query).

    A key sits at p mod s. The query is read at p mod s against its own chunk, at p mod s + s (capped at
    chunk_size) against the chunk before, and at chunk_size against anything older.
    """
    chunk = chunk_size - local_size
    in_chunk = positions % chunk
    return in_chunk, (in_chunk, torch.clamp(in_chunk + chunk, max=chunk_size), torch.full_like(positions, chunk_size))


def chunk_parts(query_positions: torch.Tensor, key_positions: torch.Tensor, chunk: int):
    """(intra, successive): which part each (query, key) pair is in, (B or 1, 1, T, L) bool each (neither: inter).

    query_positions (B or 1, T), key_positions (B or 1, L); chunks are ``chunk`` positions long.
    """
    distance = (query_positions // chunk)[:, None, :, None] - (key_positions // chunk)[:, None, None, :]
    return distance == 0, distance == 1


# ----------------------------------------------------------------------------- attention


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dim: the half-split layout of Hugging Face checkpoints."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_by(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, hd) rotated by cos/sin (B, T, hd): one half of apply_rotary_pos_emb."""
    return (x * cos.unsqueeze(1)) + (rotate_half(x) * sin.unsqueeze(1))


def rotate_dual_chunk(query: torch.Tensor, key: torch.Tensor, dual_chunk: DualChunkRotary):
    """The query (B, H, T, hd) rotated once per part, [intra, successive, inter], and the key (B, KVH, T, hd)
    rotated at p mod s, as it is cached."""
    return [rotate_by(query, cos, sin) for cos, sin in dual_chunk.queries], rotate_by(key, *dual_chunk.key)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KVH, L, hd) -> (B, KVH * n_rep, L, hd): query head h reads key/value head h // n_rep."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def attend_by_part(
    queries: list[torch.Tensor],
    key: torch.Tensor,
    value: torch.Tensor,
    intra: torch.Tensor,
    successive: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    groups: int,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with one score matrix per part, each pair reading its own part's score, one softmax.

    queries: 3 x (B, H, T, hd), rotated for intra / successive / inter; key, value (B, KVH, L, hd), keys rotated
    at p mod s; intra, successive (B or 1, 1, T, L) bool; attention_mask additive (B or 1, 1, T, L) or None.
    Returns the output (B, H, T, hd) and the attention weights (B, H, T, L).
    """
    key_states = repeat_kv(key, groups).transpose(2, 3)  # (B, H, hd, L)
    value_states = repeat_kv(value, groups)  # (B, H, L, hd)

    intra_scores, successive_scores, inter_scores = (torch.matmul(q, key_states) for q in queries)  # (B, H, T, L)
    attn_weights = torch.where(intra, intra_scores, torch.where(successive, successive_scores, inter_scores))
    attn_weights = attn_weights * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    # softmax in fp32 at least (fp64 stays fp64), as eager attention does
    softmax_dtype = torch.promote_types(queries[0].dtype, torch.float32)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=softmax_dtype).to(queries[0].dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=training)
    return torch.matmul(attn_weights, value_states), attn_weights  # (B, H, T, hd), (B, H, T, L)


# ----------------------------------------------------------------------------- the deploy package's side


def dual_chunk_settings(config) -> tuple[int, int] | None:
    """(chunk_size, local_size) from config.dual_chunk_attention_config, or None when DCA is off."""
    settings = getattr(config, "dual_chunk_attention_config", None)
    if not settings:
        return None
    missing = [key for key in ("chunk_size", "local_size") if key not in settings]
    if missing:
        raise ValueError(f"dual_chunk_attention_config lacks {missing}: give chunk_size and local_size")
    chunk_size, local_size = int(settings["chunk_size"]), int(settings["local_size"])
    if not 0 <= local_size < chunk_size:
        raise ValueError(f"dual_chunk_attention_config: need 0 <= local_size ({local_size}) "
                         f"< chunk_size ({chunk_size})")
    if getattr(config, "sliding_window", None) is not None:
        raise ValueError("dual_chunk_attention_config and a sliding window cannot be combined: switch one off")
    return chunk_size, local_size


def dual_chunk_rotary(
    rotary_emb: nn.Module,
    config,
    hidden_states: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    key_length: int,
) -> DualChunkRotary:
    """Rotations and part masks of Dual Chunk Attention for one forward of the package's Qwen2Model.

    Key j's position is the count of real tokens before it (from the 2D attention_mask, as position_ids
    are), else j. ``rotary_emb(hidden_states, positions)`` gives cos/sin (YaRN's factor included).
    """
    chunk_size, local_size = dual_chunk_settings(config)
    if attention_mask is not None and attention_mask.dim() == 2:
        key_positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -key_length:]  # (B, L)
    else:
        key_positions = torch.arange(key_length, device=position_ids.device)[None, :]  # (1, L)
    key, queries = rotary_positions(position_ids, chunk_size, local_size)  # (B or 1, T) each
    intra, successive = chunk_parts(position_ids, key_positions, chunk_size - local_size)
    return DualChunkRotary(
        key=rotary_emb(hidden_states, key),
        queries=tuple(rotary_emb(hidden_states, p) for p in queries),
        intra=intra,
        successive=successive,
    )


def dual_chunk_attention_forward(
    module: nn.Module,
    queries: list[torch.Tensor],
    key: torch.Tensor,
    value: torch.Tensor,
    dual_chunk: DualChunkRotary,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    """eager_attention_forward's contract (output (B, T, H, hd), weights) for the package's attention module."""
    attn_output, attn_weights = attend_by_part(queries, key, value, dual_chunk.intra, dual_chunk.successive,
                                               attention_mask, scaling, module.num_key_value_groups, dropout,
                                               module.training)
    return attn_output.transpose(1, 2).contiguous(), attn_weights
