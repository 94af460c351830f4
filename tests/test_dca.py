"""Dual Chunk Attention: the fast path (the deploy package's formulation, ``scratch/dual_chunk.py``, run on blocks of
queries) vs the naive per-pair reference, decode vs prefill, and DCA vs plain causal RoPE attention when the sequence
fits in one chunk."""
import pytest
import torch
import torch.nn.functional as F

from qwen2lib.model.long_context import dca_config_from_dict
from qwen2lib.scratch.dca import (NOT_THIS_KIND, dca_masks, dual_chunk_attention, dual_chunk_attention_decode,
                                  naive_dual_chunk_attention, relative_position_matrices)
from qwen2lib.scratch.rope import apply_rotary, default_inv_freq, rope_cos_sin

HD = 16
INV_FREQ = default_inv_freq(HD, 10000.0)


def make_qkv(T, heads_per_kv, kv_heads=2, batch=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * heads_per_kv, T, HD, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, T, HD, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, T, HD, generator=g, dtype=dtype)
    return q, k, v


def causal_rope_attention(q, k, v):
    """Ordinary causal attention with RoPE at absolute positions 0..T-1."""
    T = q.shape[2]
    cos, sin = rope_cos_sin(INV_FREQ, torch.arange(T))
    group = q.shape[1] // k.shape[1]
    k_rot = apply_rotary(k, cos, sin).repeat_interleave(group, dim=1)
    v_rep = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(apply_rotary(q, cos, sin), k_rot, v_rep, is_causal=True)


def spec_query_position(i, j, chunk_size, local_size):
    """The DCA rule transcribed from its definition with plain ints (None where j > i)."""
    s = chunk_size - local_size
    if j > i:
        return None
    if j // s == i // s:
        return "intra", i % s
    if j // s == i // s - 1:
        return "successive", min(i % s + s, chunk_size)
    return "inter", chunk_size


# ----------------------------------------------------------------------------- positions


@pytest.mark.parametrize("chunk_size,local_size", [(12, 4), (10, 2), (8, 5), (3, 1)])
def test_relative_positions_match_definition(chunk_size, local_size):
    T, s = 30, chunk_size - local_size
    rel = relative_position_matrices(T, chunk_size, local_size)
    for i in range(T):
        for j in range(T):
            rule = spec_query_position(i, j, chunk_size, local_size)
            for kind in rel:
                expected = NOT_THIS_KIND if rule is None or rule[0] != kind else rule[1] - j % s
                assert rel[kind][i, j].item() == expected, (kind, i, j)


def test_relative_positions_hand_checked_row():
    # chunk_size 3, local_size 1 -> s = 2; query 5 is in chunk 2 at offset 1
    rel = relative_position_matrices(6, 3, 1)
    # keys 0,1 inter: query at 3, keys at 0,1 | keys 2,3 successive: query at min(1+2, 3) = 3 | keys 4,5 intra
    assert rel["inter"][5].tolist() == [3, 2, -1, -1, -1, -1]
    assert rel["successive"][5].tolist() == [-1, -1, 3, 2, -1, -1]
    assert rel["intra"][5].tolist() == [-1, -1, -1, -1, 1, 0]


@pytest.mark.parametrize("chunk_size,local_size", [(12, 4), (10, 2), (8, 5), (16, 4)])
def test_relative_positions_properties(chunk_size, local_size):
    T = 50
    rel = relative_position_matrices(T, chunk_size, local_size)
    masks = dca_masks(T, chunk_size, local_size)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]

    # the masks partition the causal lower triangle exactly: every j <= i in one kind, j > i in none
    coverage = sum(m.long() for m in masks.values())
    assert torch.equal(coverage, torch.tril(torch.ones(T, T, dtype=torch.long)))
    for kind in rel:
        assert torch.equal(rel[kind] != NOT_THIS_KIND, masks[kind])
        d = rel[kind][masks[kind]]
        assert d.min() >= 0 and d.max() <= chunk_size  # never farther than the model was trained on
    assert torch.equal(rel["intra"][masks["intra"]], (i - j).expand(T, T)[masks["intra"]])
    # successive keeps the true distance until the query position hits chunk_size, then caps there
    succ = torch.minimum(i - j, chunk_size - j % (chunk_size - local_size))
    assert torch.equal(rel["successive"][masks["successive"]], succ[masks["successive"]])


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("heads_per_kv", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 5, 8])
def test_single_chunk_equals_causal_rope_attention(T, heads_per_kv):
    q, k, v = make_qkv(T, heads_per_kv)  # s = 8: the whole sequence is one chunk
    expected = causal_rope_attention(q, k, v)
    kw = dict(chunk_size=12, local_size=4)
    torch.testing.assert_close(dual_chunk_attention(q, k, v, INV_FREQ, **kw), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(naive_dual_chunk_attention(q, k, v, INV_FREQ, **kw), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size,local_size", [(12, 4), (16, 4), (10, 2), (8, 5)])
@pytest.mark.parametrize("heads_per_kv", [1, 2, 4])
@pytest.mark.parametrize("T", [37, 50])
def test_matches_naive_over_many_chunks(T, heads_per_kv, chunk_size, local_size):
    q, k, v = make_qkv(T, heads_per_kv, seed=T + heads_per_kv)
    fast = dual_chunk_attention(q, k, v, INV_FREQ, chunk_size=chunk_size, local_size=local_size)
    naive = naive_dual_chunk_attention(q, k, v, INV_FREQ, chunk_size=chunk_size, local_size=local_size)
    assert fast.shape == q.shape
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)


def test_matches_naive_float64_and_custom_scale():
    q, k, v = make_qkv(29, 2, dtype=torch.float64)
    kw = dict(chunk_size=10, local_size=3, scale=0.4)
    fast = dual_chunk_attention(q, k, v, INV_FREQ, **kw)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, naive_dual_chunk_attention(q, k, v, INV_FREQ, **kw), atol=1e-12, rtol=0)


@pytest.mark.parametrize("prefill", [1, 7, 8, 13])
def test_decode_step_by_step_equals_prefill(prefill):
    T, kw = 29, dict(chunk_size=12, local_size=4)  # s = 8: decode crosses three chunk boundaries
    q, k, v = make_qkv(T, 2, seed=prefill)
    full = dual_chunk_attention(q, k, v, INV_FREQ, **kw)

    outs = [dual_chunk_attention(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], INV_FREQ, **kw)]
    for t in range(prefill, T):
        step = dual_chunk_attention_decode(
            q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], INV_FREQ, position_start=t, **kw
        )
        outs.append(step)
    decoded = torch.cat(outs, dim=2)
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(decoded, naive_dual_chunk_attention(q, k, v, INV_FREQ, **kw), atol=1e-5, rtol=0)


def test_decode_several_tokens_at_once():
    T, kw = 31, dict(chunk_size=10, local_size=2)
    q, k, v = make_qkv(T, 4, seed=3)
    full = dual_chunk_attention(q, k, v, INV_FREQ, **kw)
    starts = [0, 5, 11, 12, 25, T]  # uneven steps, some straddling a chunk boundary
    outs = [
        dual_chunk_attention_decode(q[:, :, a:b], k[:, :, :b], v[:, :, :b], INV_FREQ, position_start=a, **kw)
        for a, b in zip(starts, starts[1:])
    ]
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-5, rtol=0)


def test_checks_can_fail():
    """The equality tests are not vacuous: a wrong query rule or plain RoPE gives a clearly different output."""
    T = 40
    q, k, v = make_qkv(T, 2, seed=7)
    right = dual_chunk_attention(q, k, v, INV_FREQ, chunk_size=12, local_size=4)
    # same chunk length s = 8, so only the successive clamp and the inter position move (12 -> 13)
    wrong_rule = naive_dual_chunk_attention(q, k, v, INV_FREQ, chunk_size=13, local_size=5)
    assert (right - wrong_rule).abs().max() > 1e-3
    # beyond one chunk DCA is not ordinary attention
    assert (right - causal_rope_attention(q, k, v)).abs().max() > 1e-3
    # and the first chunk, where the rules agree, is untouched by the wrong rule
    torch.testing.assert_close(right[:, :, :8], wrong_rule[:, :, :8], atol=1e-5, rtol=0)


def test_rejects_bad_shapes_and_sizes():
    q, k, v = make_qkv(10, 2)
    with pytest.raises(ValueError, match="local_size"):
        dual_chunk_attention(q, k, v, INV_FREQ, chunk_size=4, local_size=4)
    with pytest.raises(ValueError, match="multiple"):
        dual_chunk_attention(q[:, :3], k, v, INV_FREQ, chunk_size=8, local_size=2)
    with pytest.raises(ValueError, match="cached keys"):
        dual_chunk_attention_decode(q[:, :, :1], k, v, INV_FREQ, position_start=3, chunk_size=8, local_size=2)


# ----------------------------------------------------------------------------- config


def test_config_from_qwen2_5_1m_style_dict():
    d = {
        "chunk_size": 262144,
        "local_size": 8192,
        "original_max_position_embeddings": 32768,
        "sparse_attention_config": None,
    }
    assert dca_config_from_dict(d) == (262144, 8192, 32768)


@pytest.mark.parametrize(
    "bad,key",
    [
        ({"local_size": 2, "original_max_position_embeddings": 16}, "chunk_size"),
        ({"chunk_size": 8, "original_max_position_embeddings": 16}, "local_size"),
        ({"chunk_size": 8, "local_size": 2}, "original_max_position_embeddings"),
        ({"chunk_size": 8, "local_size": 8, "original_max_position_embeddings": 16}, "local_size"),
        ({"chunk_size": 8, "local_size": 9, "original_max_position_embeddings": 16}, "local_size"),
        ({"chunk_size": 0, "local_size": 2, "original_max_position_embeddings": 16}, "chunk_size"),
        ({"chunk_size": 8, "local_size": -1, "original_max_position_embeddings": 16}, "local_size"),
        ({"chunk_size": 8, "local_size": 0, "original_max_position_embeddings": 16}, "local_size"),
        ({"chunk_size": 8, "local_size": 2, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),
        ({"chunk_size": 8.0, "local_size": 2, "original_max_position_embeddings": 16}, "chunk_size"),
        ({"chunk_size": True, "local_size": 2, "original_max_position_embeddings": 16}, "chunk_size"),
    ],
)
def test_config_validation_names_the_bad_key(bad, key):
    with pytest.raises(ValueError, match=key):
        dca_config_from_dict(bad)


def test_config_must_be_a_dict():
    with pytest.raises(ValueError, match="dict"):
        dca_config_from_dict(None)
