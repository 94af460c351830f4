"""Rotary position embeddings as pure functions: default, linear, dynamic-NTK and YaRN.

Every function takes plain numbers and returns tensors, so notebook 00 can plot them
and the tests can compare them one for one with transformers' ``modeling_rope_utils``.
"""
from __future__ import annotations

import math

import torch


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """theta_i = base^(-2i/d) for i in [0, d/2). Returns (hd/2,) float32."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def linear_inv_freq(head_dim: int, base: float, factor: float) -> torch.Tensor:
    """Position interpolation: every frequency divided by ``factor``."""
    return default_inv_freq(head_dim, base) / factor


def dynamic_ntk_inv_freq(head_dim: int, base: float, factor: float, max_position: int, seq_len: int) -> torch.Tensor:
    """Dynamic NTK: the base grows with the sequence length once it passes ``max_position``."""
    seq_len = max(seq_len, max_position)
    scaled_base = base * ((factor * seq_len / max_position) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return default_inv_freq(head_dim, scaled_base)


def yarn_attention_factor(factor: float, mscale: float = 1.0) -> float:
    """YaRN's temperature correction: 0.1 * mscale * ln(s) + 1 (1 when not extending)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def yarn_correction_dim(num_rotations: float, head_dim: int, base: float, original_max_position: int) -> float:
    """The (fractional) dimension index whose wavelength fits ``num_rotations`` times in the original context."""
    return (head_dim * math.log(original_max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_correction_range(
    beta_fast: float, beta_slow: float, head_dim: int, base: float, original_max_position: int, truncate: bool = True
) -> tuple[float, float]:
    """Dimension range [low, high] between pure extrapolation (fast dims) and pure interpolation (slow dims)."""
    low = yarn_correction_dim(beta_fast, head_dim, base, original_max_position)
    high = yarn_correction_dim(beta_slow, head_dim, base, original_max_position)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def yarn_ramp(low: float, high: float, n: int) -> torch.Tensor:
    """NTK-by-parts ramp over the n = hd/2 frequency indices: 0 below ``low``, 1 above ``high``. (n,)"""
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    return torch.clamp((torch.arange(n, dtype=torch.float32) - low) / (high - low), 0, 1)


def yarn_inv_freq(
    head_dim: int,
    base: float,
    factor: float,
    original_max_position: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> torch.Tensor:
    """YaRN frequencies: high-frequency dims kept (extrapolated), low-frequency dims divided by ``factor``."""
    extrapolated = default_inv_freq(head_dim, base)  # (hd/2,)
    interpolated = extrapolated / factor
    low, high = yarn_correction_range(beta_fast, beta_slow, head_dim, base, original_max_position, truncate)
    keep = 1 - yarn_ramp(low, high, head_dim // 2)  # 1 where the dimension rotates fast enough to extrapolate
    return interpolated * (1 - keep) + extrapolated * keep


def inv_freq_from_scaling(
    head_dim: int, base: float, rope_scaling: dict | None, max_position: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scale for a HF-style ``rope_scaling`` dict (or None).

    Follows the pinned transformers: for YaRN, ``original_max_position_embeddings`` only sets
    the correction range and the factor is taken as given; only a missing factor is derived as
    max_position / original.
    """
    if not rope_scaling:
        return default_inv_freq(head_dim, base), 1.0
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind == "default":
        return default_inv_freq(head_dim, base), 1.0
    if kind == "linear":
        return linear_inv_freq(head_dim, base, rope_scaling["factor"]), 1.0
    if kind == "dynamic":
        return dynamic_ntk_inv_freq(head_dim, base, rope_scaling["factor"], max_position, seq_len or max_position), 1.0
    if kind == "yarn":
        original = rope_scaling.get("original_max_position_embeddings") or max_position
        factor = rope_scaling.get("factor") or max_position / original
        attention_factor = rope_scaling.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = yarn_attention_factor(factor, mscale) / yarn_attention_factor(factor, mscale_all_dim)
            else:
                attention_factor = yarn_attention_factor(factor)
        inv_freq = yarn_inv_freq(
            head_dim,
            base,
            factor,
            original,
            beta_fast=rope_scaling.get("beta_fast") or 32.0,
            beta_slow=rope_scaling.get("beta_slow") or 1.0,
            truncate=rope_scaling.get("truncate", True),
        )
        return inv_freq, float(attention_factor)
    raise ValueError(f"rope_scaling type {kind!r} is not supported; use default, linear, dynamic or yarn")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer ``positions`` (..., T) -> two (..., T, hd) float32 tensors."""
    freqs = positions[..., None].float() * inv_freq.float()  # (..., T, hd/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd): the half-split layout HF checkpoints use
    return angles.cos() * scale, angles.sin() * scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by cos/sin of shape (T, hd) or (B, T, hd)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd) broadcasts over heads
    return (x * cos.to(x.dtype)) + (rotate_half(x) * sin.to(x.dtype))
