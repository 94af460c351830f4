"""Seeded random weights at a checkpoint's real shapes: what ``weights="random"`` loads, and ``tiny-random``.

``expected_tensor_shapes`` is the tensor list of a Qwen2 checkpoint from its config.json alone; the random values
of each tensor come from its own seeded generator (``random_tensor_chunks``), so they are the same whether a
checkpoint is streamed to disk tensor by tensor (``write_random_checkpoint``: any size) or built whole in memory
(``build_random_model``: small models). ``loading`` caches such checkpoints and checks real ones against the shapes.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Iterator

import torch
from transformers import GenerationConfig, Qwen2ForCausalLM

from .model_config import shape_numbers
from .registry import ModelSpec
from .tensorio import MAX_SHARD_BYTES, write_shards

# Bump when the recipe of random weights changes: cached random checkpoints of the old recipe are then rebuilt.
RANDOM_RECIPE = "r3"
RANDOM_CHUNK = 1 << 22  # elements drawn at a time: a tensor's values depend on this, so it is part of the recipe


def expected_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a Qwen2ForCausalLM checkpoint with this config.json (lm_head only when untied)."""
    s = shape_numbers(config)
    H, I, V, n_heads, n_kv, hd = s["H"], s["I"], s["V"], s["n_h"], s["n_kv"], s["hd"]
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(s["L"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (n_heads * hd, H), p + "self_attn.q_proj.bias": (n_heads * hd,),
            p + "self_attn.k_proj.weight": (n_kv * hd, H), p + "self_attn.k_proj.bias": (n_kv * hd,),
            p + "self_attn.v_proj.weight": (n_kv * hd, H), p + "self_attn.v_proj.bias": (n_kv * hd,),
            p + "self_attn.o_proj.weight": (H, n_heads * hd),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
        })
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (V, H)
    return shapes


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def random_tensor_chunks(config: dict, name: str, shape: tuple[int, ...], seed: int,
                         dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The seeded random values of one tensor, flat, ``RANDOM_CHUNK`` elements at a time (in ``dtype``).

    Seed semantics: each tensor has its own generator, seeded by sha256("<seed>:<tensor name>"), so a tensor's
    values do not depend on the order tensors are made in, nor on any other tensor. Like transformers' own init:
    Linear weights and embeddings are N(0, initializer_range) (drawn in fp32, then cast), biases 0, norms 1.
    """
    numel = math.prod(shape)
    if name.endswith("norm.weight") or name.endswith(".bias"):
        value = 1.0 if name.endswith("norm.weight") else 0.0
        yield torch.full((numel,), value, dtype=dtype)
        return
    generator = torch.Generator().manual_seed(_tensor_seed(seed, name))
    std = float(config.get("initializer_range", 0.02))
    for start in range(0, numel, RANDOM_CHUNK):
        yield (torch.randn(min(RANDOM_CHUNK, numel - start), generator=generator) * std).to(dtype)


def random_state_dict(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of the random checkpoint whole (small models: ``tiny-random``), the same values as streamed."""
    return {name: torch.cat(list(random_tensor_chunks(config, name, shape, seed, dtype))).reshape(shape)
            for name, shape in expected_tensor_shapes(config).items()}


def write_random_checkpoint(config, folder: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                            max_shard_bytes: int | None = None) -> list[Path]:
    """config.json, generation_config.json and the seeded random weights of ``config`` (a Qwen2Config), written
    tensor by tensor: memory holds one chunk of one tensor, whatever the model's size."""
    config.qwen2lib_random_weights = True
    config.architectures = ["Qwen2ForCausalLM"]  # what llama.cpp's convert_hf_to_gguf.py detects the model by
    config.dtype = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}[dtype]
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    as_dict = config.to_dict()
    specs = {name: (shape, dtype) for name, shape in expected_tensor_shapes(as_dict).items()}
    return write_shards(folder, specs, lambda name: random_tensor_chunks(as_dict, name, specs[name][0], seed, dtype),
                        max_shard_bytes or MAX_SHARD_BYTES)


def build_random_model(spec: ModelSpec, dtype: torch.dtype, seed: int = 0):
    """The registry architecture as a whole transformers model holding ``random_state_dict``'s values (small
    models only; real shapes go through ``loading.random_checkpoint_dir``, which never builds the model)."""
    config = spec.hf_config()
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.load_state_dict(random_state_dict(config.to_dict(), seed, dtype), strict=False)  # a tied head follows
    model.config.qwen2lib_random_weights = True
    return model.eval()
