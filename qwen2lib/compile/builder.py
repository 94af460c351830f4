"""A Qwen2 decoder as an ONNX graph, built node by node from a package's weights.

No exporter: the graph is written with ``onnx.helper`` (the way onnxruntime-genai's model builder works), so every
node is one we chose. ``build_graph`` reads like a model's forward: inputs, embedding, decoder layers (attention,
MLP), head. Two operator sets:

- ``standard``: plain ONNX ops only (Gather, MatMul, Softmax, ...), runs in any ONNX runtime.
- ``contrib``: onnxruntime's fused kernels: ``GroupQueryAttention`` with the KV cache, ``RotaryEmbedding``,
  ``SkipSimplifiedLayerNormalization`` and, for int8 weights, ``MatMulNBits`` with ``bits=8`` (activations
  quantized per block at run time: ``accuracy_level=4``) or ``DynamicQuantizeMatMul`` (one activation scale per call).

Both take and return the conventional decoder names, so any tool that knows them can drive the graph:

    input_ids (B, T) int64, attention_mask (B, P + T) int64 (1 = real token, left padding only),
    position_ids (B, T) int64, past_key_values.{i}.key|value (B, n_kv, P, hd)
    -> logits (B, T or 1, V) float32, present.{i}.key|value (B, n_kv, P + T, hd)
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..model.model_config import Qwen2Args
from .dual_chunk import attention_dual_chunk, dual_chunk_inputs
from .ops import (Nodes, add_and_norm, attention_bias, attention_plain, int8_matmul, linear, packed, rms_norm,
                  rotary_tables)
from .plan import (CONTRIB, DATA_FILE, EXTERNAL_DATA_THRESHOLD, GRAPH_FILE, IR_VERSION, NP_DTYPE, ONNX_DTYPE,
                   GraphBuildError, GraphPlan, check_supported, weight_precision)


class StreamedInitializers:
    """Initializers written to ``<folder>/model.onnx.data`` as the builder makes them, page-aligned so onnxruntime
    can memory-map them; arrays under 1 KiB (shapes, scalars) stay inline. Memory holds one weight at a time."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / DATA_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "wb")
        self.protos: dict[str, onnx.TensorProto] = {}
        self.offset = 0

    def __contains__(self, name: str) -> bool:
        return name in self.protos

    def __setitem__(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes < 1024:
            self.protos[name] = numpy_helper.from_array(array, name)
            return
        pad = -self.offset % 4096
        self.fh.write(b"\0" * pad)
        self.offset += pad
        self.fh.write(array.data)
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        self.protos[name] = tensor
        self.offset += array.nbytes

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.close()

    def nbytes(self) -> int:
        return self.offset

    def inline(self) -> list[onnx.TensorProto]:
        """Every initializer with its bytes inside the proto (read back from the data file, which is removed)."""
        self.close()
        with open(self.path, "rb") as fh:
            for tensor in self.protos.values():
                if tensor.data_location == TensorProto.EXTERNAL:
                    where = {e.key: int(e.value) for e in tensor.external_data if e.key in ("offset", "length")}
                    fh.seek(where["offset"])
                    tensor.raw_data = fh.read(where["length"])
                    del tensor.external_data[:]
                    tensor.data_location = TensorProto.DEFAULT
        self.path.unlink()
        return list(self.protos.values())


@dataclass
class BuiltGraph:
    """A graph whose initializers are numpy arrays (``build_graph`` without ``out_dir``) or already on disk
    (``StreamedInitializers``), so a large model is never one protobuf and, streamed, never in memory at once."""

    graph: onnx.GraphProto  # nodes, inputs, outputs; no initializers yet
    initializers: dict[str, np.ndarray] | StreamedInitializers
    opset_imports: list
    precision: dict[str, str]  # weight group -> what it is stored as
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def streamed(self) -> bool:
        return isinstance(self.initializers, StreamedInitializers)

    def nbytes(self) -> int:
        if self.streamed:
            return self.initializers.nbytes()
        return sum(a.nbytes for a in self.initializers.values())

    def to_model(self) -> onnx.ModelProto:
        """One in-memory ModelProto (small graphs only: < 2 GiB of weights)."""
        graph = onnx.GraphProto()
        graph.CopyFrom(self.graph)
        if self.streamed:
            graph.initializer.extend(self.initializers.inline())
        else:
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
        file, streamed tensor by tensor, page-aligned so onnxruntime can memory-map them. A streamed graph
        is saved into the folder its data file was written in.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if external is None:
            external = self.nbytes() > EXTERNAL_DATA_THRESHOLD
        if self.streamed and self.initializers.path.parent.resolve() != folder.resolve():
            raise ValueError(f"a streamed graph is saved where its weights were written ({self.initializers.path.parent})")
        if not external:
            onnx.save(self.to_model(), folder / GRAPH_FILE)
            return [folder / GRAPH_FILE]
        if not self.streamed:
            writer = StreamedInitializers(folder)
            for name, array in self.initializers.items():
                writer[name] = array
            self.initializers = writer
        self.initializers.close()
        graph = onnx.GraphProto()
        graph.CopyFrom(self.graph)
        graph.initializer.extend(self.initializers.protos.values())
        onnx.save(self._model(graph), folder / GRAPH_FILE)
        return [folder / GRAPH_FILE, folder / DATA_FILE]


# ---- the decoder, part by part ---------------------------------------------------------------------

@dataclass
class _Source:
    """The weights a graph is built from: float tensors by Hugging Face name, and notebook 03's int8 ones."""

    weights: Mapping[str, np.ndarray]
    quantized: dict

    def float(self, name: str, dtype: str) -> np.ndarray:
        if name not in self.weights:
            raise GraphBuildError(f"the checkpoint has no tensor {name}")
        return np.asarray(self.weights[name], dtype=NP_DTYPE[dtype])


def build_graph(args: Qwen2Args, weights: Mapping[str, np.ndarray], plan: GraphPlan,
                quantized: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                out_dir: str | os.PathLike | None = None) -> BuiltGraph:
    """The whole decoder for ``plan``, read like a model's forward: inputs, embedding, L decoder layers, head.

    ``weights``: the package's tensors by Hugging Face name, as float32 numpy (N, K) for Linears.
    ``quantized``: int8 weights and scales by the same names (notebook 03's package), used for the groups in
    ``plan.quantize``; groups it lacks are rounded by ``qwen2lib.deploy.quantizer``. Both may be lazy mappings
    (``compile.load_weights``): each tensor is read when its node is built.
    ``out_dir``: write each initializer to ``out_dir/model.onnx.data`` as it is made (``StreamedInitializers``),
    so memory follows one weight, not the model; ``save(out_dir)`` then finishes the graph there.
    """
    check_supported(args, plan.max_sequence_length)
    g, src = Nodes(plan), _Source(weights, quantized if quantized is not None else {})
    if out_dir is not None:
        g.inits = StreamedInitializers(Path(out_dir))
    residual = plan.layer_dtype("residual")
    inputs, outputs = _io(args, plan)
    x, embed = _embedding(g, src, args, plan)  # (B, T, D)
    if plan.dual_chunk:  # its own rotary tables and mask, shared by every layer (qwen2lib.compile.dual_chunk)
        rope_tables, mask = None, dual_chunk_inputs(g, args, *plan.dual_chunk)
    else:
        rope_tables = _rotary(g, args, plan)
        mask = attention_bias(g, plan.kv_dtype if plan.operator_set == "contrib" else None)
    first_norm = "model.layers.0.input_layernorm"
    norm_in = rms_norm(g, x, g.init(f"{first_norm}.weight", src.float(f"{first_norm}.weight", residual)),
                       args.rms_norm_eps, residual, "/model/layers.0/input_layernorm")
    for i in range(args.num_hidden_layers):
        norm_in, x = _decoder_layer(g, src, args, plan, i, x, norm_in, rope_tables, mask)
    _head(g, src, args, plan, norm_in, embed)
    graph = helper.make_graph(g.nodes, "qwen2", inputs, outputs)
    opsets = [helper.make_opsetid("", plan.opset)]
    if plan.operator_set == "contrib":
        opsets.append(helper.make_opsetid(CONTRIB, 1))
    precision = weight_precision(args, plan)
    for group, size in g.int4_groups.items():  # notebook 03's int4 package: its weights, not int8 ones
        precision[group] = (f"int4 asymmetric, group {size}, zero points (MatMulNBits bits=4, "
                            f"{'float' if plan.activations == 'float' else 'int8 per-block'} activations)")
    return BuiltGraph(graph, g.inits, opsets, precision)


def _io(args: Qwen2Args, plan: GraphPlan) -> tuple[list, list]:
    """The decoder I/O convention: ids, mask, positions and the KV cache in; logits and the cache out."""
    B, T, P = plan.batch, plan.sequence, plan.past_sequence
    total = P + T if isinstance(P, int) and isinstance(T, int) else "total_sequence"
    n_kv, hd, kv = args.num_key_value_heads, args.head_dim, ONNX_DTYPE[plan.kv_dtype]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, T]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, total]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [B, T])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             [B, 1 if plan.insert_slice else T, args.vocab_size])]
    for i in range(args.num_hidden_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", kv, [B, n_kv, P, hd]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", kv, [B, n_kv, total, hd]))
    return inputs, outputs


def _embedding(g: Nodes, src: _Source, args: Qwen2Args, plan: GraphPlan) -> tuple[str, str | None]:
    """(x (B, T, D) in the residual dtype, the float table's name or None when it is int8)."""
    base, residual = plan.dtype, plan.layer_dtype("residual")
    if "embed_tokens" not in plan.quantize:
        embed = g.init("model.embed_tokens.weight", src.float("model.embed_tokens.weight", base))
        return g.cast(g.op("Gather", [embed, "input_ids"], "/model/embed_tokens/Gather"), base, residual), embed
    # int8 rows gathered and dequantized in one kernel; a tied int8 LM head reads the same bytes
    table, scales, _, _ = packed(g, plan, "model.embed_tokens.weight", src.weights, src.quantized, base)
    x = g.op("GatherBlockQuantized", [table, "input_ids", g.unsqueeze(scales, [-1], "/model/embed_tokens/scales_3d")],
             "/model/embed_tokens/GatherBlockQuantized", domain=CONTRIB, bits=8, block_size=plan.block_size,
             gather_axis=0, quantize_axis=2)  # (B, T, k_blocks, block)
    x = g.op("Reshape", [x, g.const([0, 0, -1])], "/model/embed_tokens/flatten")
    if args.hidden_size % plan.block_size:
        x = g.op("Slice", [x, g.const([0]), g.const([args.hidden_size]), g.const([2])], "/model/embed_tokens/unpad")
    return g.cast(x, base, residual), None


def _rotary(g: Nodes, args: Qwen2Args, plan: GraphPlan) -> dict:
    """Rotary cos/sin: contrib graphs pass half-width tables to RotaryEmbedding (per attention dtype); standard
    graphs gather (B, 1, T, hd) rows by position once, shared by every layer."""
    cos, sin = rotary_tables(args, plan.max_sequence_length)
    if plan.operator_set == "contrib":
        half = args.head_dim // 2
        dtypes = {plan.layer_dtype(f"layers.{i}.attention") for i in range(args.num_hidden_layers)}
        return {dt: (g.init(f"rotary.cos_cache.{dt}", cos[:, :half].astype(NP_DTYPE[dt])),
                     g.init(f"rotary.sin_cache.{dt}", sin[:, :half].astype(NP_DTYPE[dt]))) for dt in dtypes}
    cos_t, sin_t = g.init("rotary.cos", cos), g.init("rotary.sin", sin)
    return {"float32": tuple(g.unsqueeze(g.op("Gather", [t, "position_ids"], f"/model/rotary/{n}"), [1],
                                         f"/model/rotary/{n}_u") for t, n in ((cos_t, "cos"), (sin_t, "sin")))}


def _decoder_layer(g: Nodes, src: _Source, args: Qwen2Args, plan: GraphPlan, i: int, x: str, norm_in: str,
                   rope_tables: dict, mask: dict) -> tuple[str, str]:
    """x + attn(norm(x)), then + mlp(norm(.)); returns (the next norm's output, the residual stream)."""
    p, residual, eps = f"model.layers.{i}", plan.layer_dtype("residual"), args.rms_norm_eps
    o = _attention(g, src, args, plan, i, norm_in, rope_tables, mask)  # (B, T, D) residual dtype
    gamma = g.init(f"{p}.post_attention_layernorm.weight", src.float(f"{p}.post_attention_layernorm.weight", residual))
    normed, x = add_and_norm(g, o, x, gamma, eps, residual, f"/model/layers.{i}/post_attention_layernorm")
    down = _mlp(g, src, args, plan, i, normed)  # (B, T, D) residual dtype
    last = i + 1 == args.num_hidden_layers
    next_norm = "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight"
    norm_name = "/model/norm" if last else f"/model/layers.{i + 1}/input_layernorm"
    return add_and_norm(g, down, x, g.init(next_norm, src.float(next_norm, residual)), eps, residual, norm_name)


def _attention(g: Nodes, src: _Source, args: Qwen2Args, plan: GraphPlan, i: int, normed: str,
               rope_tables: dict, mask: dict) -> str:
    """o_proj(attention(rotary(q), rotary(k), v) over the cache): GroupQueryAttention, or standard ops."""
    p, pre = f"model.layers.{i}", f"/model/layers.{i}/attn"
    H, n_kv, hd, kv = args.num_attention_heads, args.num_key_value_heads, args.head_dim, plan.kv_dtype
    dt, residual = plan.layer_dtype(f"layers.{i}.attention"), plan.layer_dtype("residual")
    h = g.cast(normed, residual, dt)
    qkv = linear(g, plan, h, [f"{p}.self_attn.{n}_proj" for n in ("q", "k", "v")], src.weights, src.quantized,
                 "attention", dt, f"{pre}/qkv_proj", bias=True)
    q, k, v = g.op("Split", [qkv, g.const([H * hd, n_kv * hd, n_kv * hd])], f"{pre}/qkv_split", outputs=3,
                   axis=-1)  # (B, T, H*hd), (B, T, n_kv*hd) x2
    if plan.dual_chunk:
        attn = attention_dual_chunk(g, q, k, v, i, H, n_kv, hd, mask, dt, kv)
    elif plan.operator_set == "contrib":
        # RotaryEmbedding ops, not GroupQueryAttention's do_rotary: in a decode step that one rotates at the
        # cache length, ignoring position_ids, which is wrong for left-padded rows
        cos_c, sin_c = rope_tables[dt]
        q = g.op("RotaryEmbedding", [q, "position_ids", cos_c, sin_c], f"{pre}/q_rotary", domain=CONTRIB, num_heads=H)
        k = g.op("RotaryEmbedding", [k, "position_ids", cos_c, sin_c], f"{pre}/k_rotary", domain=CONTRIB,
                 num_heads=n_kv)
        attn = g.op("GroupQueryAttention",
                    [g.cast(q, dt, kv), g.cast(k, dt, kv), g.cast(v, dt, kv), f"past_key_values.{i}.key",
                     f"past_key_values.{i}.value", mask["seqlens_k"], mask["total_sequence_length"], "", "", "",
                     mask["bias"]],
                    f"{pre}/GroupQueryAttention", domain=CONTRIB,
                    outputs=[f"{pre}/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
                    num_heads=H, kv_num_heads=n_kv)[0]  # (B, T, H*hd)
        attn = g.cast(attn, kv, dt)
    else:
        attn = attention_plain(g, q, k, v, i, H, n_kv, hd, rope_tables["float32"], mask["bias"], dt, kv)
    o = linear(g, plan, attn, [f"{p}.self_attn.o_proj"], src.weights, src.quantized, "attention", dt, f"{pre}/o_proj")
    return g.cast(o, dt, residual)


def _mlp(g: Nodes, src: _Source, args: Qwen2Args, plan: GraphPlan, i: int, normed: str) -> str:
    """down(silu(gate(x)) * up(x)), gate|up fused into one matmul."""
    p, pre = f"model.layers.{i}", f"/model/layers.{i}/mlp"
    dt, residual = plan.layer_dtype(f"layers.{i}.mlp"), plan.layer_dtype("residual")
    h = g.cast(normed, residual, dt)
    gate_up = linear(g, plan, h, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], src.weights, src.quantized, "mlp", dt,
                     f"{pre}/gate_up_proj")
    gate, up = g.op("Split", [gate_up, g.const([args.intermediate_size] * 2)], f"{pre}/split", outputs=2, axis=-1)
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{pre}/sigmoid")], f"{pre}/silu"), up],
               f"{pre}/act_mul")  # (B, T, I)
    down = linear(g, plan, act, [f"{p}.mlp.down_proj"], src.weights, src.quantized, "mlp", dt, f"{pre}/down_proj")
    return g.cast(down, dt, residual)


def _head(g: Nodes, src: _Source, args: Qwen2Args, plan: GraphPlan, hidden: str, embed: str | None) -> None:
    """logits = hidden @ W_head^T, for the last position only when ``plan.insert_slice``."""
    if plan.insert_slice:
        hidden = g.op("Slice", [hidden, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1])],
                      "/model/last_position/Slice")  # (B, 1, D)
    lm_dt = plan.layer_dtype("lm_head")
    hidden = g.cast(hidden, plan.layer_dtype("residual"), lm_dt)
    head_name = "model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"
    if "lm_head" in plan.quantize:
        # The head always runs MatMulNBits: for a 151,936-row table it is bandwidth-bound whatever the kernel,
        # and a tied head then reads the embedding's int8 bytes.
        head_activations = "int8_per_block" if plan.activations == "int8_per_tensor" else None
        logits = int8_matmul(g, plan, hidden, [head_name], src.weights, src.quantized, lm_dt, "/lm_head",
                             activations=head_activations)
    else:
        # Gemm with transB reads the (V, D) table as stored, so a tied head shares the embedding's copy.
        shared = args.tie_word_embeddings and lm_dt == plan.dtype and embed is not None
        table = embed if shared else g.init("lm_head.weight", src.float(head_name, lm_dt))
        flat = g.op("Reshape", [hidden, g.const([-1, args.hidden_size])], "/lm_head/flatten")
        logits = g.op("Gemm", [flat, table], "/lm_head/Gemm", transB=1)
        lead = g.op("Shape", [hidden], "/lm_head/lead_shape", start=0, end=2)
        logits = g.op("Reshape", [logits, g.op("Concat", [lead, g.const([args.vocab_size])], "/lm_head/shape", axis=0)],
                      "/lm_head/unflatten")
    if lm_dt == "float32":  # name the head's own output: a float->float Cast would copy B x V floats a step
        producer = next(n for n in g.nodes if logits in n.output)
        producer.output[list(producer.output).index(logits)] = "logits"
    else:
        g.op("Cast", [logits], "/logits/Cast", outputs=["logits"], to=TensorProto.FLOAT)


# ---- inspection ---------------------------------------------------------------------------------

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
