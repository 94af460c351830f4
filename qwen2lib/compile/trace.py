"""The standard-ops graph as the deployment guide's compiler makes it: a trace of the deploy package's model.

Notebook 01's patches exist for this: eager attention with the mask built from comparisons, the KV cache
as explicit tensors in and out, and ``insert_slice``. With them ``torch.onnx.export`` (the dynamo exporter)
traces the package's ``Qwen2ForCausalLM`` into plain ONNX ops with the same decoder I/O convention as
the hand-built graphs (``qwen2lib.compile.builder``):

    input_ids (B, T), attention_mask (B, P + T), position_ids (B, T), past_key_values.{i}.key|value
    (B, n_kv, P, hd) -> logits (B, T or 1, V), present.{i}.key|value (B, n_kv, P + T, hd)

so ``OnnxCausalLM`` runs either. The contrib-ops graphs stay hand-built: the exporter emits no
onnxruntime fused kernels.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch

from .plan import DATA_FILE, EXTERNAL_DATA_THRESHOLD, GRAPH_FILE

# example shapes, none of them 0 or 1 (the exporter would specialise such an axis); every axis is dynamic
TRACE_BATCH, TRACE_TOKENS, TRACE_PAST = 2, 5, 3


class _DecoderIO(torch.nn.Module):
    """The package's model with flat, named decoder inputs and outputs (what ONNX runtimes expect)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, position_ids, past):
        out = self.lm(input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=past,
                      use_cache=False)
        presents = [t for key, value in out.presents for t in (key, value)]
        return (out.logits, *presents)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    kv = [(i, n) for i in range(num_layers) for n in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{n}" for i, n in kv],
            ["logits"] + [f"present.{i}.{n}" for i, n in kv])


def _example(config) -> tuple:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = (TRACE_BATCH, config.num_key_value_heads, TRACE_PAST, head_dim)
    ids = torch.randint(0, config.vocab_size, (TRACE_BATCH, TRACE_TOKENS), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(TRACE_BATCH, TRACE_PAST + TRACE_TOKENS, dtype=torch.long)
    positions = torch.arange(TRACE_PAST, TRACE_PAST + TRACE_TOKENS)[None].expand(TRACE_BATCH, -1)
    past = [(torch.zeros(kv), torch.zeros(kv)) for _ in range(config.num_hidden_layers)]
    return ids, mask, positions, past


def export_package_graph(model, folder: str | os.PathLike, *, opset: int = 21, external: bool | None = None,
                         max_positions: int = 4096) -> list[Path]:
    """Trace the deploy package's fp32 model into ``folder/model.onnx`` (+ ``model.onnx.data`` when the weights
    pass 256 MB or ``external``); returns the files written."""
    folder = Path(folder)
    config = model.config
    batch = torch.export.Dim("batch", min=1, max=1024)
    new = torch.export.Dim("sequence", min=1, max=max_positions)
    past = torch.export.Dim("past_sequence", min=0, max=max_positions)
    total = torch.export.Dim("total_sequence", min=1, max=2 * max_positions)
    shapes = {"input_ids": {0: batch, 1: new}, "attention_mask": {0: batch, 1: total},
              "position_ids": {0: batch, 1: new}, "past": [({0: batch, 2: past}, {0: batch, 2: past})]
              * config.num_hidden_layers}
    names_in, names_out = io_names(config.num_hidden_layers)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if external is None:
        external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # e.g. "torchvision is not installed": true and beside the point
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # axis renames the exporter announces
        torch.onnx.export(_DecoderIO(model).eval(), _example(config), str(folder / GRAPH_FILE), dynamo=True,
                          input_names=names_in, output_names=names_out, dynamic_shapes=shapes,
                          opset_version=opset, external_data=external, verbose=False)
    quiet.setLevel(level)
    return [p for p in (folder / GRAPH_FILE, folder / DATA_FILE) if p.is_file()]

