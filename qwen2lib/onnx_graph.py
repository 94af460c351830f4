"""A Qwen2 decoder as an ONNX graph, built node by node from the checkpoint's weights.

No exporter: the graph is written with ``onnx.helper`` (the way onnxruntime-genai's model builder
works), so every node is one we chose. Two operator sets:

- ``standard``: plain ONNX ops only (Gather, MatMul, Softmax, ...), runs in any ONNX runtime.
- ``contrib``: onnxruntime's fused kernels: ``GroupQueryAttention`` with the KV cache,
  ``RotaryEmbedding``, ``SkipSimplifiedLayerNormalization`` and, for int8 weights, ``MatMulNBits``
  with ``bits=8`` (activations quantized to int8 per block at run time: ``accuracy_level=4``), or
  ``DynamicQuantizeMatMul`` (one activation scale per call, MLAS's u8s8 GEMM).

Both take and return the conventional decoder names, so any tool that knows them can drive the graph:

    input_ids (B, T) int64, attention_mask (B, P + T) int64 (1 = real token, left padding only),
    position_ids (B, T) int64, past_key_values.{i}.key|value (B, n_kv, P, hd)
    -> logits (B, T or 1, V) float32, present.{i}.key|value (B, n_kv, P + T, hd)

Precision is per weight group (``GraphPlan``): fp32, fp16 (with named parts kept in fp32 when fp16
would overflow) or int8 weights.
"""
from __future__ import annotations

import collections
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .config_schema import PROJECTIONS
from .int8 import quantize_per_block, quantize_weight
from .model import Qwen2Args

FP16_MAX = 65504.0
CONTRIB = "com.microsoft"
IR_VERSION = 10  # onnxruntime 1.32 reads IR <= 11; 10 keeps the graph loadable by older runtimes too
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# A protobuf message cannot exceed 2 GiB; keep headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
WEIGHT_GROUPS = ("embed_tokens", "attention", "mlp", "norms", "lm_head")
QUANTIZABLE_GROUPS = ("embed_tokens", "attention", "mlp", "lm_head")

_ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
_NP_DTYPE = {"float32": np.float32, "float16": np.float16}


class GraphBuildError(ValueError):
    """The checkpoint uses a feature the compiled graphs do not implement."""


ACTIVATION_SCHEMES = ("int8_per_block", "int8_per_tensor", "float")


@dataclass(frozen=True)
class GraphPlan:
    operator_set: str = "contrib"  # standard | contrib
    opset: int = 21
    dtype: str = "float32"  # float32 | float16: weights, activations and KV cache
    quantize: tuple[str, ...] = ()  # groups stored as int8: embed_tokens (GatherBlockQuantized), attention, mlp, lm_head (MatMulNBits)
    block_size: int = 128  # MatMulNBits block along K (activations are quantized per block too)
    granularity: str = "per_channel"  # per_channel: one scale per output channel | per_block
    activations: str = "int8_per_block"  # int8_per_block (MatMulNBits accuracy_level 4) | int8_per_tensor
    # (DynamicQuantizeMatMul; the head stays MatMulNBits) | float (MatMulNBits accuracy_level 0: slow)
    per_block_projections: tuple[str, ...] = ()  # with int8_per_tensor: projections kept per block (MatMulNBits)
    max_sequence_length: int = 4096  # rows of the rotary tables = the largest position + 1
    batch: str | int = "batch"
    sequence: str | int = "sequence"
    past_sequence: str | int = "past_sequence"
    last_position_logits: bool = False  # insert_slice: logits of the last position only
    keep_fp32: frozenset = frozenset()  # fp16 graphs: "residual", "lm_head", "layers.{i}.attention|mlp"

    def __post_init__(self):
        if self.operator_set not in ("standard", "contrib"):
            raise ValueError(f"operator_set={self.operator_set!r}: use 'standard' or 'contrib'")
        if self.dtype not in _ONNX_DTYPE:
            raise ValueError(f"dtype={self.dtype!r}: use float32 or float16")
        if self.quantize and self.operator_set != "contrib":
            raise ValueError("int8 weights need operator_set 'contrib' (onnxruntime's MatMulNBits)")
        unknown = set(self.quantize) - set(QUANTIZABLE_GROUPS)
        if unknown:
            raise ValueError(f"cannot quantize {sorted(unknown)}: quantizable groups are {QUANTIZABLE_GROUPS}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size}: MatMulNBits needs a power of two >= 16")
        if self.activations not in ACTIVATION_SCHEMES:
            raise ValueError(f"activations={self.activations!r}: use one of {', '.join(ACTIVATION_SCHEMES)}")
        if self.activations == "int8_per_tensor" and self.granularity != "per_channel":
            raise ValueError(f"{self.activations} activations take per-channel weight scales only")
        if self.granularity not in ("per_channel", "per_block"):
            raise ValueError(f"granularity={self.granularity!r}: use per_channel or per_block")
        unknown = set(self.per_block_projections) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"per_block_projections {sorted(unknown)}: projections are {', '.join(PROJECTIONS)}")
        if self.per_block_projections and self.activations != "int8_per_tensor":
            raise ValueError("per_block_projections only applies with int8_per_tensor activations")

    def activations_for(self, projection: str) -> str:
        """The activation scheme of one projection (qkv_proj, o_proj, gate_up_proj, down_proj)."""
        return "int8_per_block" if projection in self.per_block_projections else self.activations

    def layer_dtype(self, part: str) -> str:
        """Compute dtype of a part: 'residual', 'lm_head', 'layers.{i}.attention', 'layers.{i}.mlp'."""
        return "float32" if part in self.keep_fp32 else self.dtype

    @property
    def kv_dtype(self) -> str:
        return self.dtype

    @property
    def accuracy_level(self) -> int:
        return 0 if self.activations == "float" else 4


@dataclass
class BuiltGraph:
    """A graph whose initializers are still numpy arrays, so a 2 GB+ model is never one protobuf."""

    graph: onnx.GraphProto  # nodes, inputs, outputs; no initializers yet
    initializers: dict[str, np.ndarray]
    opset_imports: list
    precision: dict[str, str]  # weight group -> what it is stored as
    metadata: dict[str, str] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.initializers.values())

    def to_model(self) -> onnx.ModelProto:
        """One in-memory ModelProto (small graphs only: < 2 GiB of weights)."""
        graph = onnx.GraphProto()
        graph.CopyFrom(self.graph)
        graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in self.initializers.items())
        return self._model(graph)

    def _model(self, graph) -> onnx.ModelProto:
        model = helper.make_model(graph, opset_imports=self.opset_imports, producer_name="qwen2lib")
        model.ir_version = IR_VERSION
        for k, v in self.metadata.items():
            model.metadata_props.add(key=k, value=str(v))
        return model

    def save(self, folder: str | os.PathLike, external: bool | None = None) -> list[Path]:
        """Write ``model.onnx`` (+ ``model.onnx.data`` when external); returns the files written.

        ``external=None`` decides by size: weights over ``EXTERNAL_DATA_THRESHOLD`` go to the data
        file, streamed tensor by tensor, page-aligned so onnxruntime can memory-map them.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if external is None:
            external = self.nbytes() > EXTERNAL_DATA_THRESHOLD
        if not external:
            onnx.save(self.to_model(), folder / GRAPH_FILE)
            return [folder / GRAPH_FILE]
        graph = onnx.GraphProto()
        graph.CopyFrom(self.graph)
        offset = 0
        with open(folder / DATA_FILE, "wb") as fh:
            for name, array in self.initializers.items():
                array = np.ascontiguousarray(array)
                if array.nbytes < 1024:  # shapes and scalars stay inline: readable, and no tiny reads
                    graph.initializer.append(numpy_helper.from_array(array, name))
                    continue
                pad = -offset % 4096
                fh.write(b"\0" * pad)
                offset += pad
                fh.write(array.tobytes())
                tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                     dims=array.shape)
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(array.nbytes))):
                    tensor.external_data.add(key=key, value=value)
                graph.initializer.append(tensor)
                offset += array.nbytes
        onnx.save(self._model(graph), folder / GRAPH_FILE)
        return [folder / GRAPH_FILE, folder / DATA_FILE]


# ---- int8 weights for MatMulNBits ---------------------------------------------------------------

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
    return packed.reshape(N, k_blocks, block_size), scale.astype(_NP_DTYPE[dtype])


# ---- the builder ------------------------------------------------------------------------------

class _Nodes:
    """Append-only node list with unique names and a numpy initializer table."""

    def __init__(self, plan: GraphPlan):
        self.plan = plan
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self._consts: dict[tuple, str] = {}
        self._casts: dict[tuple[str, str], str] = {}
        self.packed: dict[str, tuple[str, str, int, int]] = {}  # int8 weights by source name, shared when tied

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
            self._casts[key] = self.op("Cast", [x], f"{x}/Cast_{to_dtype}", to=_ONNX_DTYPE[to_dtype])
        return self._casts[key]

    def unsqueeze(self, x: str, axes: list[int], name: str) -> str:
        return self.op("Unsqueeze", [x, self.const(axes)], name)

    def reduce_mean(self, x: str, axes: list[int], name: str) -> str:
        if self.plan.opset >= 18:
            return self.op("ReduceMean", [x, self.const(axes)], name, keepdims=1)
        return self.op("ReduceMean", [x], name, axes=axes, keepdims=1)


def check_supported(args: Qwen2Args, max_sequence_length: int) -> None:
    """Refuse, with the reason, what the graphs do not implement rather than compile it wrong."""
    if args.dual_chunk_attention_config:
        raise GraphBuildError("this checkpoint uses Dual Chunk Attention, which the compiled graphs do not implement; "
                              "remove dual_chunk_attention_config to compile it for contexts up to max_position_embeddings")
    if any(args.layer_window(i) for i in range(args.num_hidden_layers)):
        raise GraphBuildError("this checkpoint enables sliding-window attention (use_sliding_window: true), which the "
                              "compiled graphs do not implement; Qwen2 checkpoints ship with it off")
    kind = (args.rope_scaling or {}).get("rope_type", (args.rope_scaling or {}).get("type"))
    if kind == "dynamic" and max_sequence_length > args.max_position_embeddings:
        raise GraphBuildError(f"dynamic-NTK RoPE changes its frequencies past max_position_embeddings="
                              f"{args.max_position_embeddings}; set graph.max_sequence_length <= that value")


def rotary_tables(args: Qwen2Args, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (rows, hd) float32, computed exactly as the torch reference does (yarn scale included)."""
    import torch

    from . import rope

    inv_freq, scale = rope.inv_freq_from_scaling(args.head_dim, args.rope_theta, args.rope_scaling,
                                                 args.max_position_embeddings)
    cos, sin = rope.rope_cos_sin(inv_freq, torch.arange(rows), scale)  # (rows, hd)
    return cos.numpy().astype(np.float32), sin.numpy().astype(np.float32)


def build_graph(args: Qwen2Args, weights: Mapping[str, np.ndarray], plan: GraphPlan,
                quantized: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> BuiltGraph:
    """The whole decoder for ``plan``.

    ``weights``: the checkpoint's tensors by Hugging Face name, as float32 numpy (N, K) for Linears.
    ``quantized``: optional int8 weights and scales by the same names (notebook 03's), used instead
    of quantizing here for the groups in ``plan.quantize``.
    """
    check_supported(args, plan.max_sequence_length)
    g = _Nodes(plan)
    quantized = dict(quantized or {})
    L, D, V = args.num_hidden_layers, args.hidden_size, args.vocab_size
    H, n_kv, hd = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    base, kv = plan.dtype, plan.kv_dtype
    residual = plan.layer_dtype("residual")
    onnx_kv = _ONNX_DTYPE[kv]

    def weight(name: str, dtype: str) -> np.ndarray:
        if name not in weights:
            raise GraphBuildError(f"the checkpoint has no tensor {name}")
        return np.asarray(weights[name], dtype=_NP_DTYPE[dtype])

    # ---- inputs and outputs
    total = (plan.past_sequence + plan.sequence if isinstance(plan.past_sequence, int) and isinstance(plan.sequence, int)
             else "total_sequence")
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [plan.batch, plan.sequence]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [plan.batch, total]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [plan.batch, plan.sequence]),
    ]
    outputs = [helper.make_tensor_value_info(
        "logits", TensorProto.FLOAT, [plan.batch, 1 if plan.last_position_logits else plan.sequence, V])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", onnx_kv,
                                                        [plan.batch, n_kv, plan.past_sequence, hd]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", onnx_kv, [plan.batch, n_kv, total, hd]))

    # ---- shared: embeddings, attention bias, rotary tables
    if "embed_tokens" in plan.quantize:
        # int8 rows gathered and dequantized in one kernel; a tied int8 LM head reads the same bytes
        table, scales, _, _ = _packed(g, plan, "model.embed_tokens.weight", weights, quantized, base)
        x = g.op("GatherBlockQuantized", [table, "input_ids", g.unsqueeze(scales, [-1], "/model/embed_tokens/scales_3d")],
                 "/model/embed_tokens/GatherBlockQuantized", domain=CONTRIB, bits=8, block_size=plan.block_size,
                 gather_axis=0, quantize_axis=2)  # (B, T, k_blocks, block)
        x = g.op("Reshape", [x, g.const([0, 0, -1])], "/model/embed_tokens/flatten")
        if D % plan.block_size:
            x = g.op("Slice", [x, g.const([0]), g.const([D]), g.const([2])], "/model/embed_tokens/unpad")
        x = g.cast(x, base, residual)  # (B, T, D)
        embed = None
    else:
        embed = g.init("model.embed_tokens.weight", weight("model.embed_tokens.weight", base))
        x = g.cast(g.op("Gather", [embed, "input_ids"], "/model/embed_tokens/Gather"), base, residual)  # (B, T, D)
    cos, sin = rotary_tables(args, plan.max_sequence_length)
    mask_info = _attention_bias(g, kv if plan.operator_set == "contrib" else None)

    if plan.operator_set == "contrib":
        half = hd // 2
        rope_tables = {dt: (g.init(f"rotary.cos_cache.{dt}", cos[:, :half].astype(_NP_DTYPE[dt])),
                            g.init(f"rotary.sin_cache.{dt}", sin[:, :half].astype(_NP_DTYPE[dt])))
                       for dt in {plan.layer_dtype(f"layers.{i}.attention") for i in range(L)}}
    else:
        cos_t = g.init("rotary.cos", cos)
        sin_t = g.init("rotary.sin", sin)
        # (B, 1, T, hd): gathered once per run by position, shared by every layer
        rope_tables = {"float32": (g.unsqueeze(g.op("Gather", [cos_t, "position_ids"], "/model/rotary/cos"), [1], "/model/rotary/cos_u"),
                                   g.unsqueeze(g.op("Gather", [sin_t, "position_ids"], "/model/rotary/sin"), [1], "/model/rotary/sin_u"))}

    # ---- decoder layers
    norm_in = _rms_norm_plain(g, x, g.init("model.layers.0.input_layernorm.weight",
                                          weight("model.layers.0.input_layernorm.weight", residual)),
                              args.rms_norm_eps, residual, "/model/layers.0/input_layernorm")
    for i in range(L):
        p = f"model.layers.{i}"
        attn_dt, mlp_dt = plan.layer_dtype(f"layers.{i}.attention"), plan.layer_dtype(f"layers.{i}.mlp")
        h = g.cast(norm_in, residual, attn_dt)
        q_w = [f"{p}.self_attn.{n}_proj" for n in ("q", "k", "v")]
        qkv = _linear(g, plan, h, q_w, weights, quantized, "attention", attn_dt, f"/model/layers.{i}/attn/qkv_proj",
                      bias=True)
        q, k, v = g.op("Split", [qkv, g.const([H * hd, n_kv * hd, n_kv * hd])], f"/model/layers.{i}/attn/qkv_split",
                       outputs=3, axis=-1)  # (B, T, H*hd), (B, T, n_kv*hd) x2
        if plan.operator_set == "contrib":
            # RotaryEmbedding ops, not GroupQueryAttention's do_rotary: in a decode step that one rotates at the
            # cache length, ignoring position_ids, which is wrong for left-padded rows (measured: 2e-3 off)
            cos_c, sin_c = rope_tables[attn_dt]
            q = g.op("RotaryEmbedding", [q, "position_ids", cos_c, sin_c], f"/model/layers.{i}/attn/q_rotary",
                     domain=CONTRIB, num_heads=H)
            k = g.op("RotaryEmbedding", [k, "position_ids", cos_c, sin_c], f"/model/layers.{i}/attn/k_rotary",
                     domain=CONTRIB, num_heads=n_kv)
            attn = g.op("GroupQueryAttention",
                        [g.cast(q, attn_dt, kv), g.cast(k, attn_dt, kv), g.cast(v, attn_dt, kv),
                         f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                         mask_info["seqlens_k"], mask_info["total_sequence_length"], "", "", "", mask_info["bias"]],
                        f"/model/layers.{i}/attn/GroupQueryAttention", domain=CONTRIB,
                        outputs=[f"/model/layers.{i}/attn/GroupQueryAttention/output_0", f"present.{i}.key",
                                 f"present.{i}.value"],
                        num_heads=H, kv_num_heads=n_kv)[0]  # (B, T, H*hd)
            attn = g.cast(attn, kv, attn_dt)
        else:
            attn = _attention_plain(g, q, k, v, i, H, n_kv, hd, rope_tables["float32"], mask_info["bias"], attn_dt, kv)
        o = _linear(g, plan, attn, [f"{p}.self_attn.o_proj"], weights, quantized, "attention", attn_dt,
                    f"/model/layers.{i}/attn/o_proj")
        o = g.cast(o, attn_dt, residual)
        normed, x = _add_and_norm(g, o, x, g.init(f"{p}.post_attention_layernorm.weight",
                                                  weight(f"{p}.post_attention_layernorm.weight", residual)),
                                  args.rms_norm_eps, residual, f"/model/layers.{i}/post_attention_layernorm")
        h = g.cast(normed, residual, mlp_dt)
        gate_up = _linear(g, plan, h, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], weights, quantized, "mlp", mlp_dt,
                          f"/model/layers.{i}/mlp/gate_up_proj")
        gate, up = g.op("Split", [gate_up, g.const([args.intermediate_size] * 2)], f"/model/layers.{i}/mlp/split",
                        outputs=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], f"/model/layers.{i}/mlp/sigmoid")],
                                f"/model/layers.{i}/mlp/silu"), up], f"/model/layers.{i}/mlp/act_mul")
        down = _linear(g, plan, act, [f"{p}.mlp.down_proj"], weights, quantized, "mlp", mlp_dt,
                       f"/model/layers.{i}/mlp/down_proj")
        down = g.cast(down, mlp_dt, residual)
        next_norm = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < L else "model.norm.weight"
        norm_name = f"/model/layers.{i + 1}/input_layernorm" if i + 1 < L else "/model/norm"
        norm_in, x = _add_and_norm(g, down, x, g.init(next_norm, weight(next_norm, residual)), args.rms_norm_eps,
                                   residual, norm_name)

    # ---- head
    hidden = norm_in  # (B, T, D), the final norm's output
    if plan.last_position_logits:
        hidden = g.op("Slice", [hidden, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1])],
                      "/model/last_position/Slice")  # (B, 1, D)
    lm_dt = plan.layer_dtype("lm_head")
    hidden = g.cast(hidden, residual, lm_dt)
    head_name = "lm_head.weight" if not args.tie_word_embeddings else "model.embed_tokens.weight"
    if "lm_head" in plan.quantize:
        # The head always runs MatMulNBits: for a 151,936-row table it measured no slower than DynamicQuantizeMatMul
        # at 1 and 8 rows (bandwidth-bound either way), and a tied head then reads the embedding's int8 bytes.
        head_activations = "int8_per_block" if plan.activations == "int8_per_tensor" else None
        logits = _int8_matmul(g, plan, hidden, [head_name], weights, quantized, lm_dt, "/lm_head",
                              activations=head_activations)
    else:
        # Gemm with transB reads the (V, D) table as stored, so a tied head shares the embedding's copy.
        shared = args.tie_word_embeddings and lm_dt == base and embed is not None
        table = embed if shared else g.init("lm_head.weight", weight(head_name, lm_dt))
        flat = g.op("Reshape", [hidden, g.const([-1, D])], "/lm_head/flatten")
        logits = g.op("Gemm", [flat, table], "/lm_head/Gemm", transB=1)
        lead = g.op("Shape", [hidden], "/lm_head/lead_shape", start=0, end=2)
        logits = g.op("Reshape", [logits, g.op("Concat", [lead, g.const([V])], "/lm_head/shape", axis=0)],
                      "/lm_head/unflatten")
    if lm_dt == "float32":  # name the head's own output: a float->float Cast copies 8 x 151,936 floats a step
        producer = next(n for n in g.nodes if logits in n.output)
        producer.output[list(producer.output).index(logits)] = "logits"
    else:
        g.op("Cast", [logits], "/logits/Cast", outputs=["logits"], to=TensorProto.FLOAT)

    graph = helper.make_graph(g.nodes, "qwen2", inputs, outputs)
    opsets = [helper.make_opsetid("", plan.opset)]
    if plan.operator_set == "contrib":
        opsets.append(helper.make_opsetid(CONTRIB, 1))
    return BuiltGraph(graph, g.inits, opsets, weight_precision(args, plan))


def weight_precision(args: Qwen2Args, plan: GraphPlan) -> dict[str, str]:
    """What each weight group is stored as, for the manifest."""
    short = {"float32": "fp32", "float16": "fp16"}
    kernel = ("DynamicQuantizeMatMul, int8 per-tensor activations" if plan.activations == "int8_per_tensor" else
              f"MatMulNBits block {plan.block_size}, {'float' if plan.activations == 'float' else 'int8 per-block'} "
              "activations")

    def int8(projections=()):
        per_block = [name for name in projections if name in plan.per_block_projections]
        extra = (f"; {', '.join(per_block)}: MatMulNBits block {plan.block_size}, int8 per-block activations"
                 if per_block else "")
        return f"int8 {plan.granularity.replace('_', '-')} symmetric ({kernel}{extra})"

    out = {"embed_tokens": short[plan.dtype], "norms": short[plan.layer_dtype("residual")]}
    if "embed_tokens" in plan.quantize:
        out["embed_tokens"] = (f"int8 {plan.granularity.replace('_', '-')} symmetric (GatherBlockQuantized "
                               f"block {plan.block_size})")
    for group, projections in (("attention", ("qkv_proj", "o_proj")), ("mlp", ("gate_up_proj", "down_proj"))):
        if group in plan.quantize:
            out[group] = int8(projections)
        else:
            kept = [i for i in range(args.num_hidden_layers) if f"layers.{i}.{group}" in plan.keep_fp32]
            out[group] = short[plan.dtype] + (f" (layers {kept} kept in fp32)" if kept else "")
    out["lm_head"] = int8() if "lm_head" in plan.quantize else short[plan.layer_dtype("lm_head")]
    if "lm_head" in plan.quantize and plan.activations == "int8_per_tensor":
        out["lm_head"] = (f"int8 {plan.granularity.replace('_', '-')} symmetric (MatMulNBits block {plan.block_size}, "
                          "int8 per-block activations, every call)")
    quantized_alike = ("lm_head" in plan.quantize) == ("embed_tokens" in plan.quantize)
    if args.tie_word_embeddings and quantized_alike and plan.layer_dtype("lm_head") == plan.dtype:
        out["lm_head"] += " (tied: shares embed_tokens)"
    out["kv_cache"] = short[plan.kv_dtype]
    out["residual_stream"] = short[plan.layer_dtype("residual")]
    return out


def _attention_bias(g: _Nodes, contrib_kv_dtype: str | None) -> dict[str, str]:
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
        np_dt = _NP_DTYPE[contrib_kv_dtype]
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


def _attention_plain(g, q, k, v, i, H, n_kv, hd, rope, bias, dt, kv_dt):
    """Grouped-query attention from standard ops; scores and softmax in fp32 like the reference."""
    pre = f"/model/layers.{i}/attn"
    cos, sin = rope  # (B, 1, T, hd) float32
    q = g.op("Transpose", [g.op("Reshape", [q, g.const([0, 0, H, hd])], f"{pre}/q_heads")], f"{pre}/q_bhtd",
             perm=[0, 2, 1, 3])  # (B, H, T, hd)
    k = g.op("Transpose", [g.op("Reshape", [k, g.const([0, 0, n_kv, hd])], f"{pre}/k_heads")], f"{pre}/k_bhtd",
             perm=[0, 2, 1, 3])  # (B, n_kv, T, hd)
    v = g.op("Transpose", [g.op("Reshape", [v, g.const([0, 0, n_kv, hd])], f"{pre}/v_heads")], f"{pre}/v_bhtd",
             perm=[0, 2, 1, 3])  # (B, n_kv, T, hd)
    q, k = _rotate(g, q, cos, sin, dt, f"{pre}/q_rotary"), _rotate(g, k, cos, sin, dt, f"{pre}/k_rotary")
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


def _rotate(g, x, cos, sin, dt, name):
    """x * cos + rotate_half(x) * sin, the half-split layout of HF checkpoints."""
    cos, sin = g.cast(cos, "float32", dt), g.cast(sin, "float32", dt)
    x1, x2 = g.op("Split", [x], f"{name}/halves", outputs=2, axis=-1, **({"num_outputs": 2} if g.plan.opset >= 18 else {}))
    rotated = g.op("Concat", [g.op("Neg", [x2], f"{name}/neg"), x1], f"{name}/rotate_half", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], f"{name}/x_cos"), g.op("Mul", [rotated, sin], f"{name}/rot_sin")], name)


def _rms_norm_plain(g, x, gamma, eps, dt, name):
    """RMSNorm in fp32 from standard ops: x * rsqrt(mean(x^2) + eps) * gamma."""
    x32 = g.cast(x, dt, "float32")
    ms = g.reduce_mean(g.op("Mul", [x32, x32], f"{name}/square"), [-1], f"{name}/mean_square")
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)], f"{name}/add_eps")],
                                   f"{name}/sqrt")], f"{name}/rsqrt")
    return g.op("Mul", [g.cast(g.op("Mul", [x32, inv], f"{name}/normalize"), "float32", dt), gamma], name)


def _add_and_norm(g, delta, residual, gamma, eps, dt, name):
    """(norm(residual + delta), residual + delta): one fused kernel in contrib graphs."""
    if g.plan.operator_set == "contrib":
        normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", [delta, residual, gamma], name, domain=CONTRIB,
                                   outputs=[f"{name}/output_0", "", "", f"{name}/residual_sum"], epsilon=eps)
        return normed, total
    total = g.op("Add", [residual, delta], f"{name}/residual_add")
    return _rms_norm_plain(g, total, gamma, eps, dt, name), total


def _linear(g, plan, x, names, weights, quantized, group, dt, node_name, bias=False):
    """x @ concat(W_names)^T (+ bias): one MatMul for fused projections (q|k|v, gate|up)."""
    if group in plan.quantize:
        return _int8_matmul(g, plan, x, [f"{n}.weight" for n in names], weights, quantized, dt, node_name,
                            _bias(weights, names, dt) if bias else None)
    w = np.concatenate([np.asarray(weights[f"{n}.weight"], np.float32) for n in names], axis=0)  # (N, K)
    y = g.op("MatMul", [x, g.init(f"{node_name}.weight", np.ascontiguousarray(w.T).astype(_NP_DTYPE[dt]))],
             f"{node_name}/MatMul")
    if bias:
        y = g.op("Add", [y, g.init(f"{node_name}.bias", _bias(weights, names, dt))], f"{node_name}/Add")
    return y


def _int8_rows(plan, weights, quantized, name):
    """int8 (N, K) and scales (N, 1 or k_blocks) of one weight: notebook 03's when given, else quantized here."""
    if name in quantized:
        q, s = quantized[name]
        return np.asarray(q, np.int8), np.asarray(s, np.float32).reshape(len(q), -1)
    if plan.granularity == "per_channel":
        q, s = quantize_weight(weights[name])
        return q, s[:, None]
    return quantize_per_block(weights[name], plan.block_size)


def _packed(g, plan, names, weights, quantized, dt, node_name=None):
    """MatMulNBits initializers (B (N, k_blocks, block) uint8, scales (N, k_blocks)) for one weight or the
    row-concatenation of several (fused projections); packed once per source, so tied tables share."""
    names = [names] if isinstance(names, str) else list(names)
    key = "+".join(names)
    if key not in g.packed:
        parts = [_int8_rows(plan, weights, quantized, n) for n in names]
        k_blocks = -(-parts[0][0].shape[1] // plan.block_size)
        q = np.concatenate([p[0] for p in parts], axis=0)
        s = np.concatenate([np.repeat(p[1], k_blocks, axis=1) if p[1].shape[1] == 1 else p[1] for p in parts], axis=0)
        packed, s = pack_matmul_nbits(q, s, plan.block_size, dt)
        base = node_name or f"/{names[0].removesuffix('.weight')}"
        g.packed[key] = (g.init(f"{base}.qweight", packed), g.init(f"{base}.scales", s), q.shape[0], q.shape[1])
    return g.packed[key]


def _int8_matmul(g, plan, x, names, weights, quantized, dt, node_name, bias=None, activations=None):
    """x @ dequant(W)^T (+ bias) with int8 weights, by the plan's activation scheme."""
    activations = activations or plan.activations_for(node_name.rsplit("/", 1)[-1])
    if bias is not None and not isinstance(bias, str):
        bias = g.init(f"{node_name}.bias", bias.astype(_NP_DTYPE[dt]))
    if activations == "int8_per_tensor":
        parts = [_int8_rows(plan, weights, quantized, n) for n in names]
        q = np.concatenate([p[0] for p in parts], axis=0)  # (N, K)
        s = np.concatenate([p[1][:, 0] for p in parts]).astype(np.float32)  # (N,)
        inputs = [x, g.init(f"{node_name}.qweight_t", np.ascontiguousarray(q.T)),
                  g.init(f"{node_name}.column_scales", s), ""]
        if bias is not None:
            inputs.append(bias)
        return g.op("DynamicQuantizeMatMul", inputs, f"{node_name}/DynamicQuantizeMatMul", domain=CONTRIB)
    b, scales, N, K = _packed(g, plan, names, weights, quantized, dt, node_name)
    inputs = [x, b, scales]
    if bias is not None:
        inputs += ["", "", bias]
    return g.op("MatMulNBits", inputs, f"{node_name}/MatMulNBits", domain=CONTRIB, K=K, N=N, bits=8,
                block_size=plan.block_size, accuracy_level=plan.accuracy_level)


def _bias(weights, names, dt):
    return np.concatenate([np.asarray(weights[f"{n}.bias"], np.float32) for n in names]).astype(_NP_DTYPE[dt])


# ---- inspection -------------------------------------------------------------------------------

def op_histogram(model: onnx.ModelProto | BuiltGraph | str | os.PathLike) -> collections.Counter:
    """Node count per operator (``com.microsoft:`` prefix for onnxruntime's contrib ops), most common first."""
    if isinstance(model, BuiltGraph):
        nodes = model.graph.node
    else:
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model), load_external_data=False)
        nodes = model.graph.node
    return collections.Counter(f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                               for n in nodes)


def io_signature(model: onnx.ModelProto | str | os.PathLike) -> dict[str, list[dict]]:
    """Inputs and outputs with dtype and shape (ints for fixed axes, names for dynamic ones)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)

    def describe(vi):
        t = vi.type.tensor_type
        return {"name": vi.name, "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]}

    return {"inputs": [describe(v) for v in model.graph.input],
            "outputs": [describe(v) for v in model.graph.output]}
