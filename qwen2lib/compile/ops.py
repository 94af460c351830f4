"""The pieces a decoder graph is made of, each a small function that appends nodes: RMSNorm, the residual add +
norm (one fused kernel in contrib graphs), rotary embedding, grouped-query attention from standard ops, the
attention bias from ``attention_mask``, and the Linear layers in fp32/fp16 or int8 (``MatMulNBits``,
``DynamicQuantizeMatMul``) with weights from the one int8 quantizer (``qwen2lib/deploy/quantizer.py``).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..scratch import rope
from ..deploy.quantizer import quantize_per_block, quantize_weight
from ..model.model_config import Qwen2Args
from ..quantize.package_reader import Int4Weight
from .plan import CONTRIB, NP_DTYPE, ONNX_DTYPE, GraphPlan

class Nodes:
    """Append-only node list with unique names and a numpy initializer table."""

    def __init__(self, plan: GraphPlan):
        self.plan = plan
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self._consts: dict[tuple, str] = {}
        self._casts: dict[tuple[str, str], str] = {}
        self.packed: dict[str, tuple[str, str, int, int]] = {}  # int8 weights by source name, shared when tied
        self.int4_groups: dict[str, int] = {}  # weight group -> group size, for those stored as int4

    def init(self, name: str, array: np.ndarray) -> str:
        if name in self.inits:
            raise ValueError(f"initializer {name} defined twice")
        self.inits[name] = array
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small constant (shapes, axes, scalars), shared by value."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", array)
        return self._consts[key]

    def op(self, op_type: str, inputs: Iterable[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attrs):
        """Add one node named ``name``; returns its output name (or a list when several)."""
        outs = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def cast(self, x: str, from_dtype: str, to_dtype: str) -> str:
        if from_dtype == to_dtype:
            return x
        key = (x, to_dtype)
        if key not in self._casts:
            self._casts[key] = self.op("Cast", [x], f"{x}/Cast_{to_dtype}", to=ONNX_DTYPE[to_dtype])
        return self._casts[key]

    def unsqueeze(self, x: str, axes: list[int], name: str) -> str:
        return self.op("Unsqueeze", [x, self.const(axes)], name)

    def reduce_mean(self, x: str, axes: list[int], name: str) -> str:
        if self.plan.opset >= 18:
            return self.op("ReduceMean", [x, self.const(axes)], name, keepdims=1)
        return self.op("ReduceMean", [x], name, axes=axes, keepdims=1)


def rotary_tables(args: Qwen2Args, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (rows, hd) float32, computed exactly as the torch reference does (yarn scale included)."""
    inv_freq, scale = rope.inv_freq_from_scaling(args.head_dim, args.rope_theta, args.rope_scaling,
                                                 args.max_position_embeddings)
    cos, sin = rope.rope_cos_sin(inv_freq, torch.arange(rows), scale)  # (rows, hd)
    return cos.numpy().astype(np.float32), sin.numpy().astype(np.float32)


def pack_matmul_nbits(q: np.ndarray, scale: np.ndarray, block_size: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """int8 (N, K) + scales (N,) or (N, k_blocks) -> MatMulNBits' B (N, k_blocks, block) uint8 and scales.

    MatMulNBits stores unsigned values with an implicit zero point of 128 for 8 bits, so q + 128.
    A per-channel scale is repeated over the blocks: numerically the same per-channel quantization.
    """
    N, K = q.shape
    k_blocks = -(-K // block_size)
    packed = np.full((N, k_blocks * block_size), 128, np.uint8)  # padding dequantizes to 0
    packed[:, :K] = (q.astype(np.int16) + 128).astype(np.uint8)
    scale = np.asarray(scale, np.float32)
    if scale.ndim == 1 or scale.shape[1] == 1:
        scale = np.repeat(scale.reshape(N, 1), k_blocks, axis=1)
    if scale.shape != (N, k_blocks):
        raise ValueError(f"scales of shape {scale.shape} do not fit a ({N}, {K}) weight in blocks of {block_size}")
    return packed.reshape(N, k_blocks, block_size), scale.astype(NP_DTYPE[dtype])


def attention_bias(g: Nodes, contrib_kv_dtype: str | None) -> dict[str, str]:
    """Additive attention bias from ``attention_mask`` (+ GQA's length inputs for contrib graphs).

    contrib: padding keys masked (B, 1, T, A); GroupQueryAttention applies causality itself, told
    that every row holds A = P + T keys, so left padding is handled by the bias alone.
    standard: position-based causal mask like the torch reference: query at position p sees keys
    whose position (count of real tokens before them) is <= p and that are not padding.
    """
    A = g.op("Shape", ["attention_mask"], "/model/mask/total_len", start=1, end=2)  # (1,)
    B = g.op("Shape", ["input_ids"], "/model/mask/batch", start=0, end=1)
    T = g.op("Shape", ["input_ids"], "/model/mask/seq", start=1, end=2)
    allowed_keys = g.op("Cast", ["attention_mask"], "/model/mask/as_bool", to=TensorProto.BOOL)  # (B, A)
    if contrib_kv_dtype is not None:
        np_dt = NP_DTYPE[contrib_kv_dtype]
        keys = g.op("Where", [allowed_keys, g.const(0.0, np_dt), g.const(np.finfo(np_dt).min, np_dt)],
                    "/model/mask/key_bias")  # (B, A)
        keys = g.unsqueeze(keys, [1, 2], "/model/mask/key_bias_4d")  # (B, 1, 1, A)
        shape = g.op("Concat", [B, g.const([1]), T, A], "/model/mask/bias_shape", axis=0)
        bias = g.op("Expand", [keys, shape], "/model/mask/bias")  # (B, 1, T, A)
        total = g.op("Cast", [g.op("Squeeze", [A], "/model/mask/total_scalar")], "/model/mask/total_i32",
                     to=TensorProto.INT32)  # scalar
        seqlens = g.op("Expand", [g.op("Sub", [total, g.const(1, np.int32)], "/model/mask/last_index"), B],
                       "/model/mask/seqlens_k")  # (B,) int32
        return {"bias": bias, "seqlens_k": seqlens, "total_sequence_length": total}
    key_pos = g.op("Sub", [g.op("CumSum", ["attention_mask", g.const(1)], "/model/mask/cumsum"), g.const(1)],
                   "/model/mask/key_positions")  # (B, A)
    diff = g.op("Sub", [g.unsqueeze("position_ids", [2], "/model/mask/q_pos"),
                        g.unsqueeze(key_pos, [1], "/model/mask/k_pos")], "/model/mask/diff")  # (B, T, A)
    causal = g.op("GreaterOrEqual", [diff, g.const(0)], "/model/mask/causal")
    allowed = g.op("And", [causal, g.unsqueeze(allowed_keys, [1], "/model/mask/keys_3d")], "/model/mask/allowed")
    bias = g.op("Where", [allowed, g.const(0.0, np.float32), g.const(np.finfo(np.float32).min, np.float32)],
                "/model/mask/bias_3d")
    return {"bias": g.unsqueeze(bias, [1, 2], "/model/mask/bias")}  # (B, 1, 1, T, A): broadcasts over (n_kv, groups)


def attention_plain(g, q, k, v, i, H, n_kv, hd, rope, bias, dt, kv_dt):
    """Grouped-query attention from standard ops; scores and softmax in fp32 like the reference."""
    pre = f"/model/layers.{i}/attn"
    cos, sin = rope  # (B, 1, T, hd) float32
    q = g.op("Transpose", [g.op("Reshape", [q, g.const([0, 0, H, hd])], f"{pre}/q_heads")], f"{pre}/q_bhtd",
             perm=[0, 2, 1, 3])  # (B, H, T, hd)
    k = g.op("Transpose", [g.op("Reshape", [k, g.const([0, 0, n_kv, hd])], f"{pre}/k_heads")], f"{pre}/k_bhtd",
             perm=[0, 2, 1, 3])  # (B, n_kv, T, hd)
    v = g.op("Transpose", [g.op("Reshape", [v, g.const([0, 0, n_kv, hd])], f"{pre}/v_heads")], f"{pre}/v_bhtd",
             perm=[0, 2, 1, 3])  # (B, n_kv, T, hd)
    q, k = rotate(g, q, cos, sin, dt, f"{pre}/q_rotary"), rotate(g, k, cos, sin, dt, f"{pre}/k_rotary")
    k = g.op("Concat", [f"past_key_values.{i}.key", g.cast(k, dt, kv_dt)], f"{pre}/k_cache", outputs=[f"present.{i}.key"],
             axis=2)  # (B, n_kv, A, hd)
    v = g.op("Concat", [f"past_key_values.{i}.value", g.cast(v, dt, kv_dt)], f"{pre}/v_cache",
             outputs=[f"present.{i}.value"], axis=2)
    q5 = g.op("Reshape", [g.cast(q, dt, "float32"), g.const([0, n_kv, H // n_kv, -1, hd])], f"{pre}/q_groups")  # (B, n_kv, g, T, hd)
    kT = g.unsqueeze(g.op("Transpose", [g.cast(k, kv_dt, "float32")], f"{pre}/k_T", perm=[0, 1, 3, 2]), [2], f"{pre}/k_T5")
    scores = g.op("MatMul", [q5, kT], f"{pre}/scores")  # (B, n_kv, g, T, A)
    scores = g.op("Add", [g.op("Mul", [scores, g.const(1.0 / math.sqrt(hd), np.float32)], f"{pre}/scale"), bias],
                  f"{pre}/masked")
    probs = g.op("Softmax", [scores], f"{pre}/softmax", axis=-1)
    out = g.op("MatMul", [probs, g.unsqueeze(g.cast(v, kv_dt, "float32"), [2], f"{pre}/v5")], f"{pre}/context")  # (B, n_kv, g, T, hd)
    out = g.op("Reshape", [out, g.const([0, H, -1, hd])], f"{pre}/context_heads")  # (B, H, T, hd)
    out = g.op("Transpose", [out], f"{pre}/context_bthd", perm=[0, 2, 1, 3])
    return g.cast(g.op("Reshape", [out, g.const([0, 0, H * hd])], f"{pre}/context_flat"), "float32", dt)  # (B, T, H*hd)


def rotate(g, x, cos, sin, dt, name):
    """x * cos + rotate_half(x) * sin, the half-split layout of HF checkpoints."""
    cos, sin = g.cast(cos, "float32", dt), g.cast(sin, "float32", dt)
    x1, x2 = g.op("Split", [x], f"{name}/halves", outputs=2, axis=-1, **({"num_outputs": 2} if g.plan.opset >= 18 else {}))
    rotated = g.op("Concat", [g.op("Neg", [x2], f"{name}/neg"), x1], f"{name}/rotate_half", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], f"{name}/x_cos"), g.op("Mul", [rotated, sin], f"{name}/rot_sin")], name)


def rms_norm(g, x, gamma, eps, dt, name):
    """RMSNorm in fp32 from standard ops: x * rsqrt(mean(x^2) + eps) * gamma."""
    x32 = g.cast(x, dt, "float32")
    ms = g.reduce_mean(g.op("Mul", [x32, x32], f"{name}/square"), [-1], f"{name}/mean_square")
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)], f"{name}/add_eps")],
                                   f"{name}/sqrt")], f"{name}/rsqrt")
    return g.op("Mul", [g.cast(g.op("Mul", [x32, inv], f"{name}/normalize"), "float32", dt), gamma], name)


def add_and_norm(g, delta, residual, gamma, eps, dt, name):
    """(norm(residual + delta), residual + delta): one fused kernel in contrib graphs."""
    if g.plan.operator_set == "contrib":
        normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", [delta, residual, gamma], name, domain=CONTRIB,
                                   outputs=[f"{name}/output_0", "", "", f"{name}/residual_sum"], epsilon=eps)
        return normed, total
    total = g.op("Add", [residual, delta], f"{name}/residual_add")
    return rms_norm(g, total, gamma, eps, dt, name), total


def linear(g, plan, x, names, weights, quantized, group, dt, node_name, bias=False):
    """x @ concat(W_names)^T (+ bias): one MatMul for fused projections (q|k|v, gate|up)."""
    if group in plan.quantize:
        if isinstance(quantized.get(f"{names[0]}.weight"), Int4Weight):
            g.int4_groups[group] = quantized[f"{names[0]}.weight"].group_size
            return int4_matmul(g, plan, x, [quantized[f"{n}.weight"] for n in names], dt, node_name,
                               bias_of(weights, names, dt) if bias else None)
        return int8_matmul(g, plan, x, [f"{n}.weight" for n in names], weights, quantized, dt, node_name,
                            bias_of(weights, names, dt) if bias else None)
    w = np.concatenate([np.asarray(weights[f"{n}.weight"], np.float32) for n in names], axis=0)  # (N, K)
    y = g.op("MatMul", [x, g.init(f"{node_name}.weight", np.ascontiguousarray(w.T).astype(NP_DTYPE[dt]))],
             f"{node_name}/MatMul")
    if bias:
        y = g.op("Add", [y, g.init(f"{node_name}.bias", bias_of(weights, names, dt))], f"{node_name}/Add")
    return y


def int8_rows(plan, weights, quantized, name):
    """int8 (N, K) and scales (N, 1 or k_blocks) of one weight: notebook 03's when given, else quantized here."""
    if name in quantized:
        q, s = quantized[name]
        return np.asarray(q, np.int8), np.asarray(s, np.float32).reshape(len(q), -1)
    if plan.granularity == "per_channel":
        q, s = quantize_weight(weights[name])
        return q, s[:, None]
    return quantize_per_block(weights[name], plan.block_size)


def packed(g, plan, names, weights, quantized, dt, node_name=None):
    """MatMulNBits initializers (B (N, k_blocks, block) uint8, scales (N, k_blocks)) for one weight or the
    row-concatenation of several (fused projections); packed once per source, so tied tables share."""
    names = [names] if isinstance(names, str) else list(names)
    key = "+".join(names)
    if key not in g.packed:
        parts = [int8_rows(plan, weights, quantized, n) for n in names]
        k_blocks = -(-parts[0][0].shape[1] // plan.block_size)
        q = np.concatenate([p[0] for p in parts], axis=0)
        s = np.concatenate([np.repeat(p[1], k_blocks, axis=1) if p[1].shape[1] == 1 else p[1] for p in parts], axis=0)
        packed, s = pack_matmul_nbits(q, s, plan.block_size, dt)
        base = node_name or f"/{names[0].removesuffix('.weight')}"
        g.packed[key] = (g.init(f"{base}.qweight", packed), g.init(f"{base}.scales", s), q.shape[0], q.shape[1])
    return g.packed[key]


def int8_matmul(g, plan, x, names, weights, quantized, dt, node_name, bias=None, activations=None):
    """x @ dequant(W)^T (+ bias) with int8 weights, by the plan's activation scheme."""
    activations = activations or plan.activations_for(node_name.rsplit("/", 1)[-1])
    if bias is not None and not isinstance(bias, str):
        bias = g.init(f"{node_name}.bias", bias.astype(NP_DTYPE[dt]))
    if activations == "int8_per_tensor":
        parts = [int8_rows(plan, weights, quantized, n) for n in names]
        q = np.concatenate([p[0] for p in parts], axis=0)  # (N, K)
        s = np.concatenate([p[1][:, 0] for p in parts]).astype(np.float32)  # (N,)
        inputs = [x, g.init(f"{node_name}.qweight_t", np.ascontiguousarray(q.T)),
                  g.init(f"{node_name}.column_scales", s), ""]
        if bias is not None:
            inputs.append(bias)
        return g.op("DynamicQuantizeMatMul", inputs, f"{node_name}/DynamicQuantizeMatMul", domain=CONTRIB)
    b, scales, N, K = packed(g, plan, names, weights, quantized, dt, node_name)
    inputs = [x, b, scales]
    if bias is not None:
        inputs += ["", "", bias]
    return g.op("MatMulNBits", inputs, f"{node_name}/MatMulNBits", domain=CONTRIB, K=K, N=N, bits=8,
                block_size=plan.block_size, accuracy_level=plan.accuracy_level)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 (..., 2n) in 0..15 -> (..., n): two per byte, the even index in the low nibble (MatMulNBits' order)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def int4_matmul(g, plan, x, parts: list[Int4Weight], dt, node_name, bias=None):
    """x @ dequant(W)^T (+ bias) with MatMulNBits bits=4 from int4 weights (row-concatenated for fused
    projections): B (N, k_blocks, group / 2) uint8, scales (N, k_blocks), zero points (N, ceil(k_blocks / 2))."""
    group = parts[0].group_size
    if any(p.group_size != group for p in parts):
        raise ValueError(f"{node_name}: fused int4 weights with different group sizes")
    q = np.concatenate([p.q for p in parts])  # (N, K)
    N, K = q.shape
    k_blocks = -(-K // group)
    padded = np.zeros((N, k_blocks * group), np.uint8)  # padding multiplies nothing: A has K columns
    padded[:, :K] = q
    zero = np.concatenate([p.zero_points for p in parts]).astype(np.uint8)  # (N, k_blocks)
    if k_blocks % 2:
        zero = np.concatenate([zero, np.zeros((N, 1), np.uint8)], axis=1)
    inputs = [x, g.init(f"{node_name}.qweight4", pack_nibbles(padded).reshape(N, k_blocks, group // 2)),
              g.init(f"{node_name}.scales4", np.concatenate([p.scales for p in parts]).astype(NP_DTYPE[dt])),
              g.init(f"{node_name}.zero_points4", pack_nibbles(zero))]
    if bias is not None:
        inputs += ["", g.init(f"{node_name}.bias", bias.astype(NP_DTYPE[dt]))]
    return g.op("MatMulNBits", inputs, f"{node_name}/MatMulNBits", domain=CONTRIB, K=K, N=N, bits=4,
                block_size=group, accuracy_level=plan.accuracy_level)


def bias_of(weights, names, dt):
    return np.concatenate([np.asarray(weights[f"{n}.bias"], np.float32) for n in names]).astype(NP_DTYPE[dt])
