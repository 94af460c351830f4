"""A deploy package's model run one decoder layer at a time, as GPTQ/AWQ tooling runs calibration.

The package's own classes (its checked remote code) are built on the ``meta`` device: a skeleton with every module
and no weights. Running a batch of token blocks then goes layer by layer: the embedding rows the blocks use are read
from the safetensors (``TensorReader.rows``), layer i's tensors are read, the layer module is given them, every
block's hidden states go through it, and it goes back to ``meta`` before layer i + 1 is read. Memory holds one
layer in fp32 and the blocks' hidden states (N, T, D), whatever the model's size; the values are those of the whole
model run on the same batches (same code, same fp32 weights, same batch shapes).

The head is applied a block of vocabulary rows at a time (``logits``); calibration never needs it (its input is
the final norm's output).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM

from .package import verify_package_code
from .schemes import layer_inputs, run_decoder_layer
from ..model.footprint import release_free_memory
from ..model.tensorio import TensorReader

HEAD_ROWS = 16384  # vocabulary rows of the head multiplied at a time


class LayerwiseModel:
    """The package at ``folder`` as a skeleton whose modules get their weights one layer at a time."""

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32,
                 verify: Callable[[Path], Mapping] = verify_package_code, weights: Mapping | None = None):
        """``verify``: the check of the folder's code before it is imported (a quantized package has its own).
        ``weights``: where the tensors come from instead of the folder's safetensors (``TensorReader``'s
        ``group``/``rows``/``row_blocks``; a GGUF file's, ``model.gguf.GGUFTensors``)."""
        self.folder, self.dtype = Path(folder), dtype
        verify(self.folder)
        self.config = AutoConfig.from_pretrained(str(self.folder), trust_remote_code=True, local_files_only=True)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, trust_remote_code=True, dtype=dtype).eval()
        base = self.skeleton.model
        self.rotary = type(base.rotary_emb)(config=self.config)  # its inverse frequencies are computed, not loaded
        self.reader = weights if weights is not None else TensorReader(self.folder)
        self.head_name = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @contextlib.contextmanager
    def loaded(self, module: nn.Module, prefix: str) -> Iterator[nn.Module]:
        """``module`` holding its tensors (``prefix`` + name) for the duration of the block, then meta again."""
        names = [prefix + n for n in module.state_dict()]  # parameters and buffers (an int8 Linear's are buffers)
        weights = self.reader.group(names, self.dtype)
        # assign: the module takes the tensors read, no second copy
        module.load_state_dict({n[len(prefix):]: t for n, t in weights.items()}, strict=True, assign=True)
        del weights
        try:
            yield module
        finally:
            module.to("meta")
            release_free_memory()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) rows of the embedding table, only those rows read."""
        return self.reader.rows("model.embed_tokens.weight", ids, self.dtype)

    def _layer_inputs(self, hidden: torch.Tensor) -> dict:
        """What every layer takes besides the hidden states: the causal mask and the rotary cos/sin."""
        return layer_inputs(self.skeleton.model, self.config, self.rotary, hidden)

    @torch.no_grad()
    def run_layer(self, layer: nn.Module, i: int, hidden: torch.Tensor, extra: dict | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D): decoder layer ``i`` (``layer``: the skeleton's, loaded, or a copy) on hidden
        states that start at position 0."""
        return run_decoder_layer(layer, self.config.layer_types[i], hidden, extra or self._layer_inputs(hidden))

    @torch.no_grad()
    def final_hidden(self, batches: list[torch.Tensor],
                     on_layer: Callable[[int, list[torch.Tensor]], None] | None = None) -> list[torch.Tensor]:
        """Each (B, T) id batch -> its (B, T, D) final-norm output, the layers streamed once for all batches
        (``on_layer(i, hidden)`` after layer i with every batch's output: progress, per-layer comparisons)."""
        hidden = [self.embed(ids) for ids in batches]
        extra = [self._layer_inputs(h) for h in hidden]
        for i, layer in enumerate(self.skeleton.model.layers):
            with self.loaded(layer, f"model.layers.{i}."):
                hidden = [self.run_layer(layer, i, h, e) for h, e in zip(hidden, extra)]
            if on_layer is not None:
                on_layer(i, hidden)
        with self.loaded(self.skeleton.model.norm, "model.norm.") as norm:
            return [norm(h) for h in hidden]

    @torch.no_grad()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, V) fp32 logits, HEAD_ROWS vocabulary rows of the head at a time (a quantized head,
        which cannot be read by rows, whole)."""
        lm_head = self.skeleton.lm_head
        if not isinstance(lm_head, nn.Linear):
            with self.loaded(lm_head, "lm_head.") as module:
                return module(hidden).float()
        V = self.config.vocab_size
        logits = torch.empty(*hidden.shape[:-1], V, dtype=torch.float32)
        for start, rows in self.reader.row_blocks(self.head_name, HEAD_ROWS, self.dtype):
            logits[..., start : start + rows.shape[0]] = (hidden @ rows.T).float()
        return logits

    def logits_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """ids (B, T) -> fp32 logits (B, T, V): the reference callable of ``qwen2lib.evaluation.fidelity``, streamed."""

        def fn(ids):
            return self.head(self.final_hidden([torch.as_tensor(ids)])[0])

        return fn
