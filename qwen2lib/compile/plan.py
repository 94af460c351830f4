"""What a compiled graph is, decided before any node is written: the ``GraphPlan`` (operator set, dtype, which
weight groups are int8 and how their activations are quantized, the fixed or dynamic axes), the model features
the graphs implement (``check_supported``), how each weight group ends up stored (``weight_precision``), and
which projections keep per-block activation scales given notebook 02's statistics (``activation_outliers``).

The plan is the one validator of graph rules: ``GraphPlan.__post_init__`` refuses a plan the builder cannot
build, with a ``PlanError`` naming the field. A YAML config (``qwen2lib.compile.config_schema``) builds its plan when it
is loaded and reports that error at the line of the key the field comes from.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ..errors import Qwen2LibError
from ..model.model_config import Qwen2Args

FP16_MAX = 65504.0
CONTRIB = "com.microsoft"
IR_VERSION = 10  # onnxruntime 1.32 reads IR <= 11; 10 keeps the graph loadable by older runtimes too
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# Weights past this go to model.onnx.data (``external_data: auto``). A protobuf message cannot exceed 2 GiB, and
# an inline graph is held whole in memory while it is serialized and again while onnxruntime parses it, so only
# small graphs (tiny's) stay one file.
EXTERNAL_DATA_THRESHOLD = 256 << 20
WEIGHT_GROUPS = ("embed_tokens", "attention", "mlp", "norms", "lm_head")
QUANTIZABLE_GROUPS = ("embed_tokens", "attention", "mlp", "lm_head")
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # the Linears graphs run: q|k|v, gate|up fused
OPERATOR_SETS = ("standard", "contrib")
ACTIVATION_SCHEMES = ("int8_per_block", "int8_per_tensor", "float")
GRANULARITIES = ("per_channel", "per_block")
OPSETS = (17, 23)  # default-domain opsets onnxruntime 1.32 and the ops used accept
# a config's precision -> the graph's float dtype (int8/int4 weights compute in float32)
PRECISION_DTYPE = {"fp32": "float32", "fp16": "float16", "int8": "float32", "int4": "float32"}
QUANTIZED = ("int8", "int4")  # precisions whose weights come from notebook 03's package

ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
NP_DTYPE = {"float32": np.float32, "float16": np.float16}


class GraphBuildError(Qwen2LibError, ValueError):
    """The checkpoint uses a feature the compiled graphs do not implement."""


class PlanError(Qwen2LibError, ValueError):
    """A graph plan the builder cannot build; ``field`` names the plan field at fault."""

    def __init__(self, message: str, field: str):
        super().__init__(f"{field}: {message}")
        self.message, self.field = message, field


def _listed_once(values: tuple, allowed: tuple) -> bool:
    return set(values) <= set(allowed) and len(set(values)) == len(values)


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
    insert_slice: bool = False  # logits of the last position only (the package's insert_slice)
    keep_fp32: frozenset = frozenset()  # fp16 graphs: "residual", "lm_head", "layers.{i}.attention|mlp"
    dual_chunk: tuple[int, int] | None = None  # (chunk_size, local_size): Dual Chunk Attention (graph/dual_chunk.py)
    precision: str | None = None  # the config's fp32 | fp16 | int8 | int4, named in messages (None: int8 when quantized)

    def __post_init__(self):
        self._check_choices()
        if (self.quantize or self.precision in QUANTIZED) and self.operator_set != "contrib":
            raise PlanError(f"precision {self.precision or 'int8'} needs operator_set 'contrib' (quantized weights run "
                            "in onnxruntime's MatMulNBits); use contrib or precision fp32/fp16", "operator_set")
        if not OPSETS[0] <= self.opset <= OPSETS[1]:
            raise PlanError(f"{self.opset} is outside the supported {OPSETS[0]}-{OPSETS[1]} (onnxruntime 1.32 and the "
                            "ops used)", "opset")
        if self.activations == "int8_per_tensor" and self.granularity != "per_channel":
            raise PlanError(f"{self.activations} (DynamicQuantizeMatMul) takes per-channel weight scales only; use "
                            "granularity: per_channel", "activations")
        if not _listed_once(self.per_block_projections, PROJECTIONS):
            raise PlanError(f"{list(self.per_block_projections)}: list each of {', '.join(PROJECTIONS)} at most once",
                            "per_block_projections")
        if self.per_block_projections and self.activations != "int8_per_tensor":
            raise PlanError(f"applies with activations: int8_per_tensor only (activations here: {self.activations})",
                            "per_block_projections")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise PlanError(f"{self.block_size}: MatMulNBits needs a power of two >= 16 (16, 32, 64, 128, 256)",
                            "block_size")
        if not _listed_once(self.quantize, QUANTIZABLE_GROUPS):
            raise PlanError(f"{list(self.quantize)}: list each of {', '.join(QUANTIZABLE_GROUPS)} at most once",
                            "quantize")
        if self.dual_chunk is not None and not 0 <= self.dual_chunk[1] < self.dual_chunk[0]:
            raise PlanError(f"{self.dual_chunk}: need (chunk_size, local_size) with 0 <= local_size < chunk_size",
                            "dual_chunk")

    def _check_choices(self):
        for name, allowed in (("operator_set", OPERATOR_SETS), ("dtype", tuple(ONNX_DTYPE)),
                              ("activations", ACTIVATION_SCHEMES), ("granularity", GRANULARITIES),
                              ("precision", (None, *PRECISION_DTYPE))):
            if getattr(self, name) not in allowed:
                raise PlanError(f"{getattr(self, name)!r}: use one of {', '.join(map(str, allowed))}", name)

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


def check_supported(args: Qwen2Args, max_sequence_length: int) -> None:
    """Refuse, with the reason, what the graphs do not implement rather than compile it wrong."""
    if any(args.layer_window(i) for i in range(args.num_hidden_layers)):
        raise GraphBuildError("this checkpoint enables sliding-window attention (use_sliding_window: true), which the "
                              "compiled graphs do not implement; Qwen2 checkpoints ship with it off")
    kind = (args.rope_scaling or {}).get("rope_type", (args.rope_scaling or {}).get("type"))
    if kind == "dynamic" and max_sequence_length > args.max_position_embeddings:
        raise GraphBuildError(f"dynamic-NTK RoPE changes its frequencies past max_position_embeddings="
                              f"{args.max_position_embeddings}; set graph.max_sequence_length <= that value")



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




# The graph's projections and the Linear whose input each one reads (q|k|v share one input, gate|up another).
PROJECTION_INPUTS = {"qkv_proj": "self_attn.q_proj", "o_proj": "self_attn.o_proj", "gate_up_proj": "mlp.gate_proj",
                     "down_proj": "mlp.down_proj"}
# With one int8 scale per call, the scale follows the largest channel: a channel r times smaller than it keeps
# 127 / r levels, about log2(r) bits fewer. Past 2 bits (r = 4) the int8 graph keeps that projection's
# activations quantized per block of inputs instead, which follows the outlier only inside its own block.
OUTLIER_RATIO_FOR_PER_BLOCK = 4.0


def activation_outliers(stats: Mapping) -> dict:
    """Per graph projection, from notebook 02's statistics (``{"<linear>.absmax": (K,) tensor}``): the largest
    (max / median channel absmax) over layers of its input, and the projections whose activations that puts per
    block (``per_block_projections: auto`` of ``qwen2_int8.yaml``)."""
    ratios = {}
    for projection, linear in PROJECTION_INPUTS.items():
        worst, i = 0.0, 0
        while f"model.layers.{i}.{linear}.absmax" in stats:
            a = stats[f"model.layers.{i}.{linear}.absmax"].float()  # (K,)
            median = float(a.median())
            worst = max(worst, float(a.max()) / median if median > 0 else float("inf"))
            i += 1
        ratios[projection] = worst
    return {"max_over_median": ratios, "threshold": OUTLIER_RATIO_FOR_PER_BLOCK,
            "per_block_projections": [p for p, r in ratios.items() if r >= OUTLIER_RATIO_FOR_PER_BLOCK]}
