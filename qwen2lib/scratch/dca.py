"""Dual Chunk Attention (DCA): training-free long context by keeping every rotary distance small.

A RoPE model has only seen relative distances up to its training length. DCA (An et al. 2024,
"Training-Free Long-Context Scaling of Large Language Models"; the ``dual_chunk_attention_config``
of Qwen2.5-1M) splits the sequence into chunks of length ``s = chunk_size - local_size`` and
rotates the keys at ``p mod s``. The query gets a different rotary position depending on which
chunk the key sits in, so that the distance the model sees never passes ``chunk_size``:

    key j in the query's own chunk       (intra):      query at i mod s                -> i - j, exact
    key j in the chunk just before       (successive): query at min(i mod s + s, chunk_size)
    key j two or more chunks back        (inter):      query at chunk_size

The successive rule keeps nearby tokens in order across the chunk boundary (distance i - j while
that is at most ``chunk_size``), which is what ``local_size`` buys. Softmax still runs over every
key j <= i, one softmax over all three parts. The fast path (``dual_chunk_attention``) is the deploy
package's own code, ``dual_chunk.py``: every pair scored once per query rotation, the score of the
pair's part kept, one softmax; here it runs on blocks of queries so memory grows as L x s, not L x L.
The reference (``naive_dual_chunk_attention``) rotates a separate copy of the query for every key.

Functions here are pure and take plain tensors (q (B, H, T, hd), k/v (B, KVH, T, hd), unrotated),
so notebooks can plot them and tests can compare the fast path with ``naive_dual_chunk_attention``.

What this module leaves out of the serving implementations (vLLM / SGLang ``DualChunkFlashAttention``,
HKUNLP/ChunkLlama):
  * vLLM multiplies the softmax scale by ``max(1, 0.1 * ln(L / original_max_position_embeddings) + 1)``
    (L = sequence length) when ``original_max_position_embeddings`` is set; pass ``scale=`` to mimic it.
  * vLLM's optional MInference-style sparse attention ("critical" queries, vertical/slash indices).
  * Both rotate the inter-chunk query at ``min(2s - 1, chunk_size)`` (their successive table read at
    ``s - 1``); that equals ``chunk_size`` here whenever ``local_size < s``, true for real configs.
"""
from __future__ import annotations

import math

import torch

from . import dual_chunk
from .rope import apply_rotary, rope_cos_sin

PART_KINDS = ("intra", "successive", "inter")
NOT_THIS_KIND = -1  # fill in relative_position_matrices: real DCA distances are always >= 0


# ----------------------------------------------------------------------------- config and positions


def chunk_length(chunk_size: int, local_size: int) -> int:
    """s = chunk_size - local_size: how many tokens share one block of key positions 0..s-1."""
    if not 0 <= local_size < chunk_size:
        raise ValueError(f"need 0 <= local_size < chunk_size, got local_size={local_size}, chunk_size={chunk_size}")
    return chunk_size - local_size


def dca_masks(T: int, chunk_size: int, local_size: int) -> dict[str, torch.Tensor]:
    """Which (query i, key j) pairs are intra / successive / inter. Three (T, T) bool tensors.

    They partition the causal lower triangle j <= i; pairs with j > i are in none of them.
    """
    s = chunk_length(chunk_size, local_size)
    i = torch.arange(T)[:, None]  # (T, 1) query positions
    j = torch.arange(T)[None, :]  # (1, T) key positions
    causal = j <= i
    ci, cj = i // s, j // s
    return {
        "intra": causal & (cj == ci),
        "successive": causal & (cj == ci - 1),
        "inter": causal & (cj < ci - 1),
    }


def relative_position_matrices(T: int, chunk_size: int, local_size: int) -> dict[str, torch.Tensor]:
    """DCA rotary distance (query rotary position - key rotary position) for each kind of pair.

    Returns {"intra", "successive", "inter"} -> (T, T) int64. Entry [i, j] is the distance RoPE sees
    when query i attends key j, if the pair is of that kind, else NOT_THIS_KIND (-1). Every real
    distance lies in [0, chunk_size], so -1 never collides with one.
    """
    s = chunk_length(chunk_size, local_size)
    masks = dca_masks(T, chunk_size, local_size)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    key_pos = j % s  # (1, T)
    query_pos = {
        "intra": i % s,  # (T, 1)
        "successive": torch.clamp(i % s + s, max=chunk_size),  # (T, 1)
        "inter": torch.full_like(i, chunk_size),  # (T, 1)
    }
    return {kind: torch.where(masks[kind], query_pos[kind] - key_pos, NOT_THIS_KIND) for kind in PART_KINDS}


# ----------------------------------------------------------------------------- the fast path


def _rotate_rows(x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, hd) rotated at positions (T,), through the package's rotation (``dual_chunk.rotate_by``)."""
    cos, sin = rope_cos_sin(inv_freq, positions)  # (T, hd) float32 each
    return dual_chunk.rotate_by(x, cos[None].to(x.dtype), sin[None].to(x.dtype))


def _dca_attention(q, k, v, inv_freq, position_start, chunk_size, local_size, scale):
    """Queries at absolute positions position_start.., keys/values at 0..L-1 (L = position_start + Tq).

    The deploy package's formulation (``dual_chunk.attend_by_part``: a score matrix per part, one softmax) run on
    blocks of s queries against the keys up to the block's last one, so the biggest score block is (s, L): peak
    memory O(L * s) per head instead of O(L^2).
    """
    B, H, Tq, hd = q.shape
    _, KVH, L, _ = k.shape
    if H % KVH != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({KVH})")
    if L != position_start + Tq:
        raise ValueError(f"need {position_start + Tq} cached keys (position_start + Tq), got {L}")
    s = chunk_length(chunk_size, local_size)
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)  # scores and softmax in at least fp32
    inv_freq = inv_freq.to(q.device)

    positions = torch.arange(L, device=q.device)  # (L,) key positions; the queries are the last Tq of them
    key_rotary, _ = dual_chunk.rotary_positions(positions, chunk_size, local_size)
    k_rot = dual_chunk.repeat_kv(_rotate_rows(k.to(dtype), inv_freq, key_rotary), H // KVH)  # (B, H, L, hd)
    v_rep = dual_chunk.repeat_kv(v.to(dtype), H // KVH)  # (B, H, L, hd), once, not per block

    out = torch.empty(B, H, Tq, hd, dtype=dtype, device=q.device)
    for start in range(0, Tq, s):
        n = min(s, Tq - start)
        end = position_start + start + n  # keys past the block's last query are masked for all of it: left out
        qpos = positions[end - n : end]  # (n,) absolute query positions
        _, query_rotary = dual_chunk.rotary_positions(qpos, chunk_size, local_size)
        qb = q[:, :, start : start + n].to(dtype)  # (B, H, n, hd)
        queries = [_rotate_rows(qb, inv_freq, p) for p in query_rotary]
        intra, successive = dual_chunk.chunk_parts(qpos[None], positions[None, :end], s)  # (1, 1, n, end)
        causal = torch.zeros(n, end, dtype=dtype, device=q.device)  # (n, end) additive
        causal = causal.masked_fill(positions[None, :end] > qpos[:, None], torch.finfo(dtype).min)
        out[:, :, start : start + n], _ = dual_chunk.attend_by_part(
            queries, k_rot[:, :, :end], v_rep[:, :, :end], intra, successive, causal, scale, groups=1
        )
    return out.to(q.dtype)


# ----------------------------------------------------------------------------- public attention


def dual_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    chunk_size: int,
    local_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal DCA for a whole sequence at positions 0..T-1.

    q (B, H, T, hd), k/v (B, KVH, T, hd) *unrotated*; inv_freq (hd/2,) as from rope.default_inv_freq.
    Returns (B, H, T, hd). When T <= chunk_size - local_size this is ordinary causal RoPE attention.
    """
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"q has {q.shape[2]} positions but k has {k.shape[2]}; use dual_chunk_attention_decode")
    return _dca_attention(q, k, v, inv_freq, 0, chunk_size, local_size, scale)


def dual_chunk_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    position_start: int,
    chunk_size: int,
    local_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """DCA for new queries at positions position_start .. position_start + Tq - 1 against a cache.

    q (B, H, Tq, hd); k_cache/v_cache (B, KVH, position_start + Tq, hd), the *unrotated* keys and
    values of every position so far, the new ones included. Returns (B, H, Tq, hd).
    Keys are rotated here at p mod s; a serving stack would cache them already rotated, which works
    because that rotation depends on nothing but p.
    """
    return _dca_attention(q, k_cache, v_cache, inv_freq, position_start, chunk_size, local_size, scale)


def _rotate(x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The reference's rotation, rope.apply_rotary: no code shared with the fast path's."""
    cos, sin = rope_cos_sin(inv_freq, positions)  # (T, hd) each
    return apply_rotary(x, cos, sin)


def naive_dual_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    chunk_size: int,
    local_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference DCA, slow on purpose: one query at a time, a separately rotated copy of it per key.

    The query rotary position for pair (i, j) is read back from relative_position_matrices
    (distance + key position), so this shares no code path with the fast one (``dual_chunk.py``).
    """
    B, H, T, hd = q.shape
    KVH = k.shape[1]
    s = chunk_length(chunk_size, local_size)
    scale = 1.0 / math.sqrt(hd) if scale is None else scale

    rel = relative_position_matrices(T, chunk_size, local_size)
    key_pos = torch.arange(T) % s  # (T,)
    query_pos = torch.full((T, T), NOT_THIS_KIND, dtype=torch.long)  # (T, T): query rotary position per pair
    for kind in PART_KINDS:
        query_pos = torch.where(rel[kind] != NOT_THIS_KIND, rel[kind] + key_pos[None, :], query_pos)

    k_rot = _rotate(k, inv_freq, key_pos.to(q.device)).repeat_interleave(H // KVH, dim=1)  # (B, H, T, hd)
    v_rep = v.repeat_interleave(H // KVH, dim=1)  # (B, H, T, hd)

    out = torch.empty_like(q)
    for i in range(T):
        n = i + 1  # keys 0..i
        qi = q[:, :, i : i + 1, :].expand(B, H, n, hd)  # the same query, once per key
        qi = _rotate(qi, inv_freq, query_pos[i, :n].to(q.device))  # each copy at its pair's position
        scores = (qi * k_rot[:, :, :n, :]).sum(-1) * scale  # (B, H, n)
        probs = torch.softmax(scores, dim=-1)  # one softmax over all keys j <= i
        out[:, :, i, :] = torch.einsum("bhj,bhjd->bhd", probs, v_rep[:, :, :n, :])
    return out
