"""Figures notebook 00 computes about a model's architecture: parameters, KV-cache memory, RoPE, YaRN, DCA."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import replace

import pandas as pd
import psutil
import torch
from transformers import Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import logging as hf_logging

from . import rope
from ..model.footprint import release_free_memory
from .model import Qwen2
from ..model.model_config import shape_numbers
from ..model.registry import resolve

COMPONENTS = ("embeddings", "attention", "mlp", "norms", "lm_head")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


def component_of(parameter_name: str) -> str:
    if "embed_tokens" in parameter_name:
        return "embeddings"
    if "self_attn" in parameter_name:
        return "attention"
    if ".mlp." in parameter_name:
        return "mlp"
    if "norm" in parameter_name:
        return "norms"
    if parameter_name.startswith("lm_head"):
        return "lm_head"
    raise ValueError(f"parameter {parameter_name!r} belongs to no known component")


def parameter_breakdown(model: torch.nn.Module) -> dict[str, int]:
    """Real parameter count per component (a tied lm_head shares the embedding and counts once)."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():  # named_parameters yields a shared tensor once
        counts[component_of(name)] += p.numel()
    return counts


def parameter_formula(cfg: dict) -> dict[str, int]:
    """The same counts from config.json alone: what each block's shapes imply."""
    s = shape_numbers(cfg)
    D, I, L, V, H, KV, hd = s["H"], s["I"], s["L"], s["V"], s["n_h"], s["n_kv"], s["hd"]
    attention = D * H * hd + H * hd + 2 * (D * KV * hd + KV * hd) + H * hd * D  # q,k,v with bias; o without
    return {
        "embeddings": V * D,
        "attention": L * attention,
        "mlp": L * 3 * D * I,
        "norms": L * 2 * D + D,
        "lm_head": 0 if cfg["tie_word_embeddings"] else V * D,
    }


def kv_bytes_per_token(cfg: dict, dtype: str = "bfloat16", multi_head: bool = False) -> int:
    """Bytes of K and V cached per token across all layers; ``multi_head`` as if every head had its own KV."""
    s = shape_numbers(cfg)
    return 2 * s["L"] * (s["n_h"] if multi_head else s["n_kv"]) * s["hd"] * DTYPE_BYTES[dtype]


def kv_cache_table(names: list[str], context: int = 32768, batch: int = 1, dtype: str = "bfloat16"):
    """One row per model: KV bytes per token and at ``context`` tokens, GQA vs multi-head."""
    rows = []
    for name in names:
        cfg = resolve(name).config
        gqa, mha = kv_bytes_per_token(cfg, dtype), kv_bytes_per_token(cfg, dtype, multi_head=True)
        rows.append(
            {
                "model": name,
                "q_heads": cfg["num_attention_heads"],
                "kv_heads": cfg["num_key_value_heads"],
                "KiB/token GQA": gqa / 1024,
                "KiB/token MHA": mha / 1024,
                f"GiB @{context // 1024}k x{batch} GQA": gqa * context * batch / 2**30,
                f"GiB @{context // 1024}k x{batch} MHA": mha * context * batch / 2**30,
                "saving": mha / gqa,
            }
        )
    return pd.DataFrame(rows)


def rope_wavelengths(head_dim: int, base: float) -> torch.Tensor:
    """Tokens per full turn of each rotary pair: 2*pi / theta_i. (hd/2,)"""
    return 2 * math.pi / rope.default_inv_freq(head_dim, base)


def longest_distinguishable_distance(head_dim: int, base: float) -> float:
    """The slowest pair's wavelength: past it even the slowest rotation repeats, so distances alias."""
    return float(rope_wavelengths(head_dim, base).max())


def yarn_factor_behaviour(head_dim: int = 128, base: float = 1_000_000.0, factor: float = 4.0,
                          original: int = 32768, max_position: int = 32768) -> dict:
    """Which YaRN the installed transformers computes for Qwen's documented recipe.

    Qwen's config keeps ``max_position_embeddings: 32768`` and adds
    ``rope_scaling: {type: yarn, factor: 4.0, original_max_position_embeddings: 32768}``. Read as
    "factor = max_position / original", the factor would be 1.0 and YaRN a no-op.
    """
    config = Qwen2Config(
        hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_position,
        rope_parameters={"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original, "rope_theta": base},
    )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the mismatch warning is the point of the demonstration, not noise
    try:
        installed, installed_scale = ROPE_INIT_FUNCTIONS["yarn"](config)
    finally:
        hf_logging.set_verbosity(verbosity)
    as_given = rope.yarn_inv_freq(head_dim, base, factor, original)
    overwritten = rope.yarn_inv_freq(head_dim, base, max_position / original, original)
    return {
        "installed_inv_freq": installed,
        "factor_as_given": as_given,
        "factor_overwritten": overwritten,
        "keeps_factor": bool(torch.allclose(installed, as_given)),
        "overwrites_factor": bool(torch.allclose(installed, overwritten)),
        "attention_factor": float(installed_scale),
    }


class PeakRSS:
    """Sample the process's resident memory in a thread; ``peak - baseline`` approximates the peak working set."""

    def __init__(self, interval_s: float = 0.0005):
        self.process, self.interval, self.peak, self.baseline = psutil.Process(), interval_s, 0, 0
        self._stop = threading.Event()

    def __enter__(self):
        release_free_memory()
        self.baseline = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.baseline) / 2**20


def measure_long_context(model, seq_lens: list[int], dca_config: dict, repeats: int = 2, seed: int = 0):
    """Prefill time and peak extra memory, full attention vs Dual Chunk Attention, same weights.

    ``model`` is a from-scratch ``qwen2lib.scratch.model.Qwen2``. Returns a DataFrame with one row per length.
    """
    dca_model = Qwen2(replace(model.args, dual_chunk_attention_config=dca_config)).eval()
    dca_model.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for T in seq_lens:
        ids = torch.randint(0, model.args.vocab_size, (1, T), generator=generator)
        row = {"tokens": T}
        for label, m in (("full", model), ("dca", dca_model)):
            times, peaks = [], []
            with torch.no_grad():
                for _ in range(repeats):
                    with PeakRSS() as mem:
                        start = time.perf_counter()
                        m(ids, insert_slice=True)
                        times.append(time.perf_counter() - start)
                    peaks.append(mem.extra_mib)
            row[f"{label} s"] = min(times)
            row[f"{label} peak MiB"] = min(peaks)
        rows.append(row)
    return pd.DataFrame(rows)
