"""The patches, in order: notebook 01 reads them like a patch series, one file each.

  p1 relative_imports       ``from ...x`` -> ``from transformers.x``; the config import points at the package's
                            own ``configuration_qwen2_<target>.py`` (so it runs as ``trust_remote_code`` code)
  p2 no_runtime_dispatch    no hub kernels swapped in, no output-capture hooks: what you read is what runs
  p3 eager_attention        eager attention only, causal / sliding-window mask from arange and comparisons
                            (``deploy/inserted/causal_mask.py``, copied as ``causal_mask_<target>.py``)
  p4 explicit_kv_cache      ``past_key_values=[(k, v), ...]`` in, ``presents`` out: graph inputs and outputs
                            (``deploy/inserted/kv_cache.py``, copied as ``kv_cache_<target>.py``)
  p5 insert_slice           with ``config.insert_slice``, only the last position goes through ``lm_head``
  p6 quantize_entry_point   ``Qwen2ForCausalLM.quantize()`` / ``save_quantized()`` calling the package's own
                            ``schemes_<target>.py`` (copies of ``schemes.py`` and ``quantizer.py``)
  p7 dual_chunk_attention   with ``config.dual_chunk_attention_config``, Dual Chunk Attention (intra / successive /
                            inter-chunk parts) in prefill and cached decode; the configuration gains the field
                            (``scratch/dual_chunk.py``, copied as ``dual_chunk_<target>.py``)

The code these patches add beyond call sites lives in those modules; each patch adds one import line for its own.
"""
from __future__ import annotations

import re

from ..patch import CONFIGURATION_FILE, MODELING_FILE, Patch
from .p1_relative_imports import relative_imports_patch
from .p2_no_runtime_dispatch import no_runtime_dispatch_patch
from .p3_eager_attention import eager_attention_patch
from .p4_explicit_kv_cache import explicit_kv_cache_patch
from .p5_insert_slice import insert_slice_patches
from .p6_quantize_entry_point import quantize_entry_point_patch
from .p7_dual_chunk_attention import dual_chunk_attention_patches


def check_target(target: str) -> str:
    # The target becomes part of two module names (modeling_qwen2_<target>.py)
    if not re.fullmatch(r"[a-z][a-z0-9_]*", target):
        raise ValueError(f"target={target!r}: use a lowercase identifier such as 'onnx'")
    return target


def modeling_patches(target: str = "onnx") -> list[Patch]:
    check_target(target)
    return [
        relative_imports_patch(MODELING_FILE, target),
        no_runtime_dispatch_patch(),
        eager_attention_patch(target),
        explicit_kv_cache_patch(target),
        insert_slice_patches()[0],
        quantize_entry_point_patch(target),
        dual_chunk_attention_patches(target)[0],
    ]


def configuration_patches(target: str = "onnx") -> list[Patch]:
    check_target(target)
    return [relative_imports_patch(CONFIGURATION_FILE, target), insert_slice_patches()[1],
            dual_chunk_attention_patches(target)[1]]


