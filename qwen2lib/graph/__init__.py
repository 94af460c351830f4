"""The compiled graphs (notebook 04): ``plan.py`` decides what a graph is, ``ops.py`` holds the pieces it is made
of, ``builder.py`` builds a decoder node by node from a package's weights, ``trace.py`` traces a deploy package's
model with ``torch.onnx.export`` instead (the standard-ops graph), and ``runtime.py`` runs any of them in
onnxruntime with an explicit KV cache. ``qwen2lib.compile`` orchestrates them from a YAML config.
"""
from .builder import BuiltGraph, build_graph, io_signature, op_histogram
from .ops import pack_matmul_nbits
from .plan import FP16_MAX, GraphBuildError, GraphPlan, check_supported, weight_precision
from .runtime import GraphLoadError, KVState, OnnxCausalLM, check_finite
from .trace import export_package_graph

__all__ = ["BuiltGraph", "FP16_MAX", "GraphBuildError", "GraphLoadError", "GraphPlan", "KVState", "OnnxCausalLM",
           "build_graph", "check_finite", "check_supported", "export_package_graph", "io_signature", "op_histogram",
           "pack_matmul_nbits", "weight_precision"]
