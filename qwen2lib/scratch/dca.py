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
key j <= i: the three parts are attended separately and merged with their log-sum-exp, which is
exactly one softmax over the concatenated scores (the trick flash attention uses across tiles).

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


# ----------------------------------------------------------------------------- attention pieces


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of each query's scores.

    q (..., Tq, hd), k/v (..., Tk, hd) broadcastable, mask (Tq, Tk) bool (True = attend) or None.
    Returns out (..., Tq, hd) and lse (..., Tq). A row with no allowed key gives out 0, lse -inf,
    so it drops out of merge_attention_outputs instead of turning into NaN.
    """
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # one exp pass gives both the output and the lse (the flash-attention bookkeeping)
    row_max = scores.amax(dim=-1, keepdim=True)  # (..., Tq, 1)
    row_max = row_max.masked_fill(torch.isinf(row_max), 0.0)  # all-masked row: exp(-inf - 0) = 0, not NaN
    weights = torch.exp(scores - row_max)  # (..., Tq, Tk), largest entry 1
    total = weights.sum(dim=-1, keepdim=True)  # >= 1 unless the row is all masked
    out = (weights @ v) / torch.where(total > 0, total, 1.0)
    lse = (row_max + torch.log(total)).squeeze(-1)  # (..., Tq); -inf for an all-masked row
    return out, lse


def merge_attention_outputs(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Combine attentions over disjoint key sets into the attention over their union.

    Part p's softmax was normalised by exp(lse_p); the union's by exp(lse) = sum_p exp(lse_p).
    So reweighting each part by exp(lse_p - lse) and summing gives the single-softmax output.
    """
    lse = torch.logsumexp(torch.stack(lses), dim=0)  # (..., Tq)
    return sum(out * torch.exp(part_lse - lse)[..., None] for out, part_lse in zip(outs, lses))


def _rotate(x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cos, sin = rope_cos_sin(inv_freq, positions)  # (T, hd) each
    return apply_rotary(x, cos, sin)  # plain broadcasting, so x may carry a GQA group dim


def _dca_attention(q, k, v, inv_freq, position_start, chunk_size, local_size, scale):
    """Queries at absolute positions position_start.., keys/values at 0..L-1 (L = position_start + Tq).

    Walks the queries one chunk at a time, so the biggest score block is (s, L): peak memory
    O(L * s) per head instead of O(L^2).
    """
    B, H, Tq, hd = q.shape
    _, KVH, L, _ = k.shape
    if H % KVH != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({KVH})")
    if L != position_start + Tq:
        raise ValueError(f"need {position_start + Tq} cached keys (position_start + Tq), got {L}")
    s = chunk_length(chunk_size, local_size)
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    G = H // KVH
    dtype = torch.promote_types(q.dtype, torch.float32)  # scores and lse in at least fp32
    inv_freq = inv_freq.to(q.device)

    # query head h reads kv head h // G: group the heads so k/v broadcast instead of being copied
    qg = q.to(dtype).reshape(B, KVH, G, Tq, hd)  # (B, KVH, G, Tq, hd)
    # a key's rotation (p mod s) is the same whichever part it lands in, so rotate each key once
    k_rot = _rotate(k.to(dtype), inv_freq, torch.arange(L, device=q.device) % s)[:, :, None]  # (B, KVH, 1, L, hd)
    vg = v.to(dtype)[:, :, None]  # (B, KVH, 1, L, hd)

    out = torch.empty_like(qg)
    start = position_start
    while start < L:
        c = start // s  # chunk of this block of queries
        chunk_start = c * s
        end = min(chunk_start + s, L)
        qpos = torch.arange(start, end, device=q.device)  # (n,) absolute query positions
        qb = qg[..., start - position_start : end - position_start, :]  # (B, KVH, G, n, hd)
        outs, lses = [], []

        # intra: the query's own chunk, causal, true relative distances
        kpos = torch.arange(chunk_start, end, device=q.device)
        causal = kpos[None, :] <= qpos[:, None]  # (n, end - chunk_start)
        o, lse = attention_with_lse(
            _rotate(qb, inv_freq, qpos % s), k_rot[..., chunk_start:end, :], vg[..., chunk_start:end, :], scale, causal
        )
        outs.append(o)
        lses.append(lse)

        if c >= 1:  # successive: the whole previous chunk, all keys before every query, no mask
            succ_pos = torch.clamp(qpos % s + s, max=chunk_size)
            o, lse = attention_with_lse(
                _rotate(qb, inv_freq, succ_pos), k_rot[..., chunk_start - s : chunk_start, :],
                vg[..., chunk_start - s : chunk_start, :], scale,
            )
            outs.append(o)
            lses.append(lse)

        if c >= 2:  # inter: everything older, seen from the farthest position the model knows
            inter_pos = torch.full_like(qpos, chunk_size)
            o, lse = attention_with_lse(
                _rotate(qb, inv_freq, inter_pos), k_rot[..., : chunk_start - s, :], vg[..., : chunk_start - s, :], scale
            )
            outs.append(o)
            lses.append(lse)

        out[..., start - position_start : end - position_start, :] = merge_attention_outputs(outs, lses)
        start = end
    return out.view(B, H, Tq, hd).to(q.dtype)


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
    (distance + key position), so this shares no code path with the chunked fast version.
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
