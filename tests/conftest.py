"""Shared fixtures: no network, and tiny checkpoints that tests build themselves."""
from __future__ import annotations

import ast

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch


def tiny_hf_config(**overrides):
    """A small random Qwen2 config (the LLMs-from-scratch way: tiny, then compare to the reference)."""
    from transformers import Qwen2Config

    cfg = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        bos_token_id=0,
        eos_token_id=1,
    )
    cfg.update(overrides)
    return Qwen2Config(**cfg)


def absmax_stats(model, ids) -> dict[str, torch.Tensor]:
    """Per-input-channel absmax of every Linear, computed directly (the statistics SmoothQuant reads)."""
    stats, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(mod, args, name=name):
                x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
                stats[f"{name}.absmax"] = torch.maximum(stats.get(f"{name}.absmax", x), x)
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return stats


@pytest.fixture
def make_checkpoint(tmp_path):
    """Factory: save a seeded random transformers Qwen2 checkpoint (safetensors) and return its folder."""
    from transformers import Qwen2ForCausalLM

    def make(name: str = "ckpt", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_hf_config(**overrides)).eval()
        folder = tmp_path / name
        model.save_pretrained(folder)
        return folder

    return make


def imported_names(text: str) -> set[str]:
    """Every module a Python source imports, anywhere in it, as written (``.cli``, ``argparse``)."""
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names
