"""What a compiled graph is, decided before any node is written: the ``GraphPlan`` (operator set, dtype, which
weight groups are int8 and how their activations are quantized, the fixed or dynamic axes), the model features
the graphs implement (``check_supported``), and how each weight group ends up stored (``weight_precision``).

The YAML validator (``qwen2lib.config_schema``) checks the config file; this plan is what the builder reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ..config_schema import PROJECTIONS
from ..model import Qwen2Args

FP16_MAX = 65504.0
CONTRIB = "com.microsoft"
IR_VERSION = 10  # onnxruntime 1.32 reads IR <= 11; 10 keeps the graph loadable by older runtimes too
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# A protobuf message cannot exceed 2 GiB; keep headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
WEIGHT_GROUPS = ("embed_tokens", "attention", "mlp", "norms", "lm_head")
QUANTIZABLE_GROUPS = ("embed_tokens", "attention", "mlp", "lm_head")

ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
NP_DTYPE = {"float32": np.float32, "float16": np.float16}


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
    dual_chunk: tuple[int, int] | None = None  # (chunk_size, local_size): Dual Chunk Attention (graph/dual_chunk.py)

    def __post_init__(self):
        if self.operator_set not in ("standard", "contrib"):
            raise ValueError(f"operator_set={self.operator_set!r}: use 'standard' or 'contrib'")
        if self.dtype not in ONNX_DTYPE:
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
        if self.dual_chunk is not None and not 0 <= self.dual_chunk[1] < self.dual_chunk[0]:
            raise ValueError(f"dual_chunk={self.dual_chunk}: need (chunk_size, local_size) with 0 <= local_size < chunk_size")

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


