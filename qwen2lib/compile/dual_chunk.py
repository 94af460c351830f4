"""Dual Chunk Attention in a graph: the deploy package's formulation (patch 7) as ONNX nodes, for every plan.

The keys of the new tokens are rotated at ``p mod s`` (s = chunk_size - local_size) and cached that way, so the
KV cache a DCA graph reads and writes is the package's. The query is rotated three times (intra ``p mod s``,
successive ``min(p mod s + s, chunk_size)``, inter ``chunk_size``); each (query, key) pair takes the score of its
part, picked by the chunk indices of the two positions, then one masked softmax. Every rotary position is at
most ``chunk_size``, so the tables have ``chunk_size + 1`` rows whatever the context.

The attention runs on standard ops in both operator sets (GroupQueryAttention rotates the query once), with the
position-based causal mask of the standard graphs; the projections around it are the plan's (fp32, fp16, int8).
"""
from __future__ import annotations

import math

import numpy as np

from .ops import Nodes, attention_bias, rotary_tables, rotate
from .manifest import DUAL_CHUNK_SCOPE

PARTS = ("intra", "successive", "inter")


def dual_chunk_inputs(g: Nodes, args, chunk_size: int, local_size: int) -> dict:
    """Once per graph: the causal/padding bias, the cos/sin of the key and of each query part, and the part of
    every (query, key) pair. Shapes: cos/sin (B, 1, T, hd) float32; intra/successive (B, 1, 1, T, A) bool."""
    pre, s = DUAL_CHUNK_SCOPE, chunk_size - local_size
    cos, sin = rotary_tables(args, chunk_size + 1)  # (chunk_size + 1, hd), YaRN's factor included
    tables = g.init("dual_chunk.cos", cos), g.init("dual_chunk.sin", sin)
    in_chunk = g.op("Mod", ["position_ids", g.const(s)], f"{pre}/query_in_chunk")  # (B, T)
    positions = {
        "key": in_chunk,
        "intra": in_chunk,
        "successive": g.op("Min", [g.op("Add", [in_chunk, g.const(s)], f"{pre}/successive_raw"), g.const(chunk_size)],
                           f"{pre}/successive_position"),
        "inter": g.const([[chunk_size]]),  # (1, 1): the same position for every query
    }

    def gathered(kind):
        return tuple(g.unsqueeze(g.op("Gather", [table, positions[kind]], f"{pre}/{kind}_{name}"), [1],
                                 f"{pre}/{kind}_{name}_4d") for table, name in zip(tables, ("cos", "sin")))

    rope = {kind: gathered(kind) for kind in ("key", "intra", "successive", "inter")}
    key_positions = g.op("Sub", [g.op("CumSum", ["attention_mask", g.const(1)], f"{pre}/mask_cumsum"), g.const(1)],
                         f"{pre}/key_positions")  # (B, A): real tokens before each key
    query_chunk = g.unsqueeze(g.op("Div", ["position_ids", g.const(s)], f"{pre}/query_chunk"), [2], f"{pre}/qc_3d")
    key_chunk = g.unsqueeze(g.op("Div", [key_positions, g.const(s)], f"{pre}/key_chunk"), [1], f"{pre}/kc_3d")
    distance = g.op("Sub", [query_chunk, key_chunk], f"{pre}/chunk_distance")  # (B, T, A)
    parts = {kind: g.unsqueeze(g.op("Equal", [distance, g.const(d)], f"{pre}/is_{kind}"), [1, 2], f"{pre}/{kind}_5d")
             for kind, d in (("intra", 0), ("successive", 1))}
    return {"bias": attention_bias(g, None)["bias"], "rope": rope, **parts}


def attention_dual_chunk(g: Nodes, q: str, k: str, v: str, i: int, H: int, n_kv: int, hd: int, dca: dict,
                         dt: str, kv_dt: str) -> str:
    """q (B, T, H*hd), k/v (B, T, n_kv*hd) unrotated -> context (B, T, H*hd) in ``dt``; present.{i}.* written."""
    pre = f"/model/layers.{i}/attn"

    def heads(x, n, name):  # (B, T, n*hd) -> (B, n, T, hd)
        return g.op("Transpose", [g.op("Reshape", [x, g.const([0, 0, n, hd])], f"{pre}/{name}_heads")],
                    f"{pre}/{name}_bhtd", perm=[0, 2, 1, 3])

    q, k, v = heads(q, H, "q"), heads(k, n_kv, "k"), heads(v, n_kv, "v")
    k = rotate(g, k, *dca["rope"]["key"], dt, f"{pre}/k_rotary_in_chunk")  # cached rotated at p mod s
    k = g.op("Concat", [f"past_key_values.{i}.key", g.cast(k, dt, kv_dt)], f"{pre}/k_cache",
             outputs=[f"present.{i}.key"], axis=2)  # (B, n_kv, A, hd)
    v = g.op("Concat", [f"past_key_values.{i}.value", g.cast(v, dt, kv_dt)], f"{pre}/v_cache",
             outputs=[f"present.{i}.value"], axis=2)
    kT = g.unsqueeze(g.op("Transpose", [g.cast(k, kv_dt, "float32")], f"{pre}/k_T", perm=[0, 1, 3, 2]), [2],
                     f"{pre}/k_T5")  # (B, n_kv, 1, hd, A)
    scores = {}
    for part in PARTS:
        qp = rotate(g, q, *dca["rope"][part], dt, f"{pre}/q_rotary_{part}")
        q5 = g.op("Reshape", [g.cast(qp, dt, "float32"), g.const([0, n_kv, H // n_kv, -1, hd])], f"{pre}/q5_{part}")
        scores[part] = g.op("MatMul", [q5, kT], f"{pre}/scores_{part}")  # (B, n_kv, g, T, A)
    picked = g.op("Where", [dca["successive"], scores["successive"], scores["inter"]], f"{pre}/scores_outer")
    picked = g.op("Where", [dca["intra"], scores["intra"], picked], f"{pre}/scores_dual_chunk")
    masked = g.op("Add", [g.op("Mul", [picked, g.const(1.0 / math.sqrt(hd), np.float32)], f"{pre}/scale"),
                          dca["bias"]], f"{pre}/masked")
    probs = g.op("Softmax", [masked], f"{pre}/softmax", axis=-1)
    out = g.op("MatMul", [probs, g.unsqueeze(g.cast(v, kv_dt, "float32"), [2], f"{pre}/v5")], f"{pre}/context")
    out = g.op("Transpose", [g.op("Reshape", [out, g.const([0, H, -1, hd])], f"{pre}/context_heads")],
               f"{pre}/context_bthd", perm=[0, 2, 1, 3])  # (B, T, H, hd)
    return g.cast(g.op("Reshape", [out, g.const([0, 0, H * hd])], f"{pre}/context_flat"), "float32", dt)
