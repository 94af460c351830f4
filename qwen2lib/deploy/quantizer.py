"""The deploy package's quantizer: the project's one home for int8 and int4 weights, used by the torch package
(notebook 03) and by the graph builder (notebook 04) alike, so a weight quantized by either is the same bytes.
The schemes built on it (which Linear gets what, SmoothQuant, AWQ) are in ``schemes.py``.

Every deploy package carries this file as ``quantization_<target>.py`` (byte for byte, under a one-line header),
so a package quantizes and reloads where only torch and transformers are installed. It therefore imports nothing
from qwen2lib (but the optional error base class, so that inside qwen2lib a bad request is a one-line error).

int8      symmetric, zero point 0, q = round(w / scale) in [-127, 127], scale = max|w| / 127 over the group (a row,
          or a block of a row). -128 is never produced and each weight is off by at most scale / 2; an all-zero
          group gets scale 1. ``Int8Linear`` with bf16 activations (W8A16) runs ``aten._weight_int8pack_mm``, the
          CPU kernel that reads int8 weights directly (dequantising the whole weight on every call costs more
          than the fp32 matmul); with int8 activations (W8A8) it quantizes them per token, dynamically, and runs
          int8 x int8 -> int32 (``torch._int_mm``), rescaled by (token scale x channel scale).
int4      0..15, asymmetric, one fp32 scale and one zero point per group of ``group_size`` inputs (default 128);
          optionally each group's range is shrunk (clipped) by the factor that minimises an importance-weighted
          error. ``Int4Linear`` dequantizes for the matmul (activations stay float).
gptq      the same int4 grid, rounded column by column in GPTQ's order: each column's rounding error is spread
          over the columns not yet rounded, weighted by the inverse of the input's second moment H = E[x x^T]
          (``gptq_int4``; ``gptq_int4_reference`` is the plain column loop it must equal).

A quantized package stores ``X.weight`` int8 (N, K) and ``X.weight_scale`` fp32 (N,); int4: ``X.weight`` uint8
(N, ceil(K / 2)) two values per byte, low nibble first, ``X.weight_scale`` fp32 and ``X.weight_zero_point`` uint8
(N, groups). Its ``modeling_qwen2_int8.py`` calls ``convert_to_int8_modules`` (below) before the weights load, so
``AutoModelForCausalLM.from_pretrained(pkg, trust_remote_code=True)`` returns the quantized model.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Inside qwen2lib a bad request is one of its one-line errors; alone, a plain ValueError. Absolute on purpose: the
# package's copy of this file must hold no ``from ..`` line, which transformers would look for as a package file.
try:
    from qwen2lib.errors import Qwen2LibError as _ErrorBase
except ImportError:
    class _ErrorBase(Exception):
        pass

DEFAULT_GROUP_SIZE = 128
GPTQ_DAMP = 0.01  # added to H's diagonal, as a fraction of its mean: H from few tokens is singular
GPTQ_BLOCK = 128  # columns rounded before their error reaches the rest of the matrix in one matmul
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # group range shrink factors tried per (row, group)


class QuantizationError(_ErrorBase, ValueError):
    """A quantization request that cannot be carried out (unknown scheme, statistics that do not fit)."""


# ---- int8 numbers -------------------------------------------------------------------------------


def _as_tensor(weight) -> tuple[torch.Tensor, bool]:
    if isinstance(weight, torch.Tensor):
        return weight.detach().float(), False
    return torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)), True


def _symmetric(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., G) float -> (int8 (..., G), fp32 scale (...)): one scale per group along the last axis."""
    absmax = groups.abs().amax(dim=-1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(groups / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_weight(weight):
    """Per output channel: (N, K) -> (int8 (N, K), fp32 scale (N,)). Torch or numpy in, the same kind out."""
    w, numpy_in = _as_tensor(weight)
    q, scale = _symmetric(w)
    return (q.numpy(), scale.numpy()) if numpy_in else (q, scale)


def quantize_per_block(weight, block_size: int):
    """Per (row, block of ``block_size`` inputs): (N, K) -> (int8 (N, K), fp32 scales (N, ceil(K / block)))."""
    w, numpy_in = _as_tensor(weight)
    N, K = w.shape
    k_blocks = -(-K // block_size)
    padded = torch.zeros(N, k_blocks * block_size)
    padded[:, :K] = w
    q, scale = _symmetric(padded.reshape(N, k_blocks, block_size))
    q = q.reshape(N, -1)[:, :K].contiguous()
    return (q.numpy(), scale.numpy()) if numpy_in else (q, scale)


def dequantize_weight(q, scale):
    """int8 (N, K) and per-channel (N,) or per-block (N, k_blocks) scales -> float32 (N, K)."""
    numpy_in = not isinstance(q, torch.Tensor)
    qt = torch.as_tensor(np.asarray(q) if numpy_in else q).float()
    st = torch.as_tensor(np.asarray(scale) if numpy_in else scale).float()
    if st.ndim == 1:
        st = st[:, None]
    block = -(-qt.shape[1] // st.shape[1])
    w = qt * st.repeat_interleave(block, dim=1)[:, : qt.shape[1]]
    return w.numpy() if numpy_in else w


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations, dynamically, one scale per row: (M, K) -> (int8 (M, K), fp32 scale (M, 1))."""
    q, scale = _symmetric(x.detach().float())
    return q, scale[:, None]


# ---- int4 numbers -------------------------------------------------------------------------------


def _asymmetric4(groups: torch.Tensor, ratio: float = 1.0):
    """(N, G, g) float -> (uint8 (N, G, g) in 0..15, fp32 scale (N, G), uint8 zero point (N, G)).

    The range [min, max] (0 always inside, so zero is exact) is shrunk by ``ratio``; every weight inside it is
    off by at most scale / 2, and an all-zero group gets scale 1."""
    lo, hi = groups.amin(-1).clamp(max=0) * ratio, groups.amax(-1).clamp(min=0) * ratio
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp(0, 15)
    return q.to(torch.uint8), scale, zero.to(torch.uint8)


def check_group_size(group_size: int) -> None:
    if group_size < 16 or group_size & (group_size - 1):
        raise QuantizationError(f"group_size={group_size}: a power of two >= 16 (32, 64, 128: what MatMulNBits runs)")


def _group_importance(importance, K: int, group_size: int) -> torch.Tensor:
    """(K,) per-input weights -> (G, g); (K, K) second moment H -> its diagonal blocks (G, g, g), zero-padded."""
    h = torch.as_tensor(importance).float()
    G = -(-K // group_size)
    if h.ndim == 1:
        return F.pad(h, (0, G * group_size - K)).reshape(G, group_size)
    h = F.pad(h, (0, G * group_size - K, 0, G * group_size - K))
    return torch.stack([h[i : i + group_size, i : i + group_size] for i in range(0, G * group_size, group_size)])


def _group_error(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Rounding errors d (N, G, g) -> (N, G): sum_j h_j d_j^2, or d H_gg d^T for H's diagonal blocks (G, g, g)."""
    if h.ndim == 2:
        return (d.square() * h).sum(-1)
    return (torch.einsum("ngi,gij->ngj", d, h) * d).sum(-1)


def quantize_int4(weight, group_size: int = DEFAULT_GROUP_SIZE, importance=None):
    """(N, K) -> (uint8 q (N, K) in 0..15, fp32 scale (N, G), uint8 zero point (N, G)), G = ceil(K / group_size).

    ``importance``: each (row, group) keeps the ``CLIP_RATIOS`` shrink of its range that minimises the expected
    output error of its group (AWQ's clipping): (K,) e.g. E[X_j^2], the error sum_j E[X_j^2] (w_j - w_q_j)^2; or the
    input's second moment H = E[x x^T] (K, K), the error d H_gg d^T with each group's own block of H (what a
    group's rounding does to the output, correlations inside the group included). None: the full range (round to
    nearest)."""
    w, numpy_in = _as_tensor(weight)
    N, K = w.shape
    G = -(-K // group_size)
    groups = torch.zeros(N, G * group_size)
    groups[:, :K] = w
    groups = groups.reshape(N, G, group_size)
    best = _asymmetric4(groups)
    if importance is not None:
        h = _group_importance(importance, K, group_size)
        best_err = None
        for ratio in CLIP_RATIOS:
            q, scale, zero = candidate = _asymmetric4(groups, ratio)
            err = _group_error((q.float() - zero[..., None].float()) * scale[..., None] - groups, h)  # (N, G)
            if best_err is None:
                best, best_err = candidate, err
                continue
            better = err < best_err
            best = tuple(torch.where(better[..., None] if new.ndim == 3 else better, new, old)
                         for new, old in zip(candidate, best))
            best_err = torch.minimum(err, best_err)
    q, scale, zero = best
    q = q.reshape(N, -1)[:, :K].contiguous()
    return (q.numpy(), scale.numpy(), zero.numpy()) if numpy_in else (q, scale, zero)


def dequantize_int4(q, scale, zero, group_size: int = DEFAULT_GROUP_SIZE):
    """uint8 (N, K) in 0..15, scales and zero points (N, G) -> float32 (N, K): (q - zero) * scale."""
    numpy_in = not isinstance(q, torch.Tensor)
    qt, st, zt = (torch.as_tensor(np.asarray(t) if numpy_in else t) for t in (q, scale, zero))
    K = qt.shape[1]
    st = st.float().repeat_interleave(group_size, dim=1)[:, :K]
    zt = zt.float().repeat_interleave(group_size, dim=1)[:, :K]
    w = (qt.float() - zt) * st
    return w.numpy() if numpy_in else w


def gptq_inverse_factor(hessian: torch.Tensor, damp: float = GPTQ_DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """H (K, K) -> (U, dead): U the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 (GPTQ's order of
    columns; row i of U, divided by U[i, i], is how column i's rounding error moves the columns after it), and the
    inputs no calibration token ever used (diag 0: their weights cannot matter, so they round to zero)."""
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True), dead


def _gptq_group(w: torch.Tensor, h_diag: torch.Tensor, group_size: int):
    """Scale and zero point (N,) of a group's columns (N, g) as they stand, range clipped by H's diagonal."""
    _, scale, zero = quantize_int4(w, group_size, h_diag)
    return scale[:, 0], zero[:, 0].float()


def _round_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) -> (q (N,) in 0..15 as float, its dequantized value (N,))."""
    q = (torch.round(w / scale) + zero).clamp(0, 15)
    return q, (q - zero) * scale


def _gptq_start(weight, hessian: torch.Tensor, group_size: int, damp: float):
    """What both GPTQ loops start from: the weight (N, K) as an fp32 copy to correct (unused inputs zeroed), the
    factor U, H's diagonal (the groups' clipping weights) and the empty q (N, K), scale and zero (N, G)."""
    w = torch.as_tensor(weight).detach().float().clone()
    N, K = w.shape
    u, dead = gptq_inverse_factor(hessian, damp)
    w[:, dead] = 0
    G = -(-K // group_size)
    return w, u, torch.diagonal(hessian).float(), (torch.zeros(N, K), torch.zeros(N, G), torch.zeros(N, G))


@torch.no_grad()
def gptq_int4(weight, hessian: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, damp: float = GPTQ_DAMP,
              block: int = GPTQ_BLOCK):
    """(N, K) weight, (K, K) input second moment -> (uint8 q (N, K), fp32 scale (N, G), uint8 zero (N, G)): the
    ``quantize_int4`` format, rounded by GPTQ. Each group's scale and zero point are fixed when its first column
    is reached (from the columns as already corrected). Columns go ``block`` at a time: within a block the error
    updates only the block's columns; the rest of the matrix gets the whole block's error in one matmul."""
    w, u, h_diag, (q, scale, zero) = _gptq_start(weight, hessian, group_size, damp)
    N, K = w.shape
    block = max(block, group_size)  # a multiple of the group size: a group never straddles two blocks
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        wb, err = w[:, b0:b1].clone(), torch.zeros(N, b1 - b0)  # (N, b)
        ub = u[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col, g = b0 + j, (b0 + j) // group_size
            if col % group_size == 0:
                scale[:, g], zero[:, g] = _gptq_group(wb[:, j : j + group_size], h_diag[col : col + group_size],
                                                      group_size)
            q[:, col], dq = _round_column(wb[:, j], scale[:, g], zero[:, g])
            err[:, j] = (wb[:, j] - dq) / ub[j, j]
            wb[:, j:] -= err[:, j : j + 1] * ub[j : j + 1, j:]  # (N, 1) x (1, b - j)
        w[:, b1:] -= err @ u[b0:b1, b1:]  # (N, b) x (b, K - b1)
    return q.to(torch.uint8), scale, zero.to(torch.uint8)


@torch.no_grad()
def gptq_int4_reference(weight, hessian: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE,
                        damp: float = GPTQ_DAMP):
    """``gptq_int4`` as the paper states it, one column at a time over the whole matrix (slow; the tests' oracle)."""
    w, u, h_diag, (q, scale, zero) = _gptq_start(weight, hessian, group_size, damp)
    for col in range(w.shape[1]):
        g = col // group_size
        if col % group_size == 0:
            scale[:, g], zero[:, g] = _gptq_group(w[:, col : col + group_size], h_diag[col : col + group_size],
                                                  group_size)
        q[:, col], dq = _round_column(w[:, col], scale[:, g], zero[:, g])
        w[:, col:] -= ((w[:, col] - dq) / u[col, col])[:, None] * u[col : col + 1, col:]
    return q.to(torch.uint8), scale, zero.to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K) in 0..15 -> (N, ceil(K / 2)): two per byte, the even index in the low nibble."""
    if q.shape[1] % 2:
        q = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, K: int) -> torch.Tensor:
    """The inverse of ``pack_int4``: (N, ceil(K / 2)) -> uint8 (N, K)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :K].contiguous()


# ---- int8 matmuls -------------------------------------------------------------------------------


def int8_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) x int8 (N, K)^T -> int32 (M, N), exactly.

    ``torch._int_mm`` on CPU (VNNI); elsewhere an emulation in float64, which is exact because every
    partial sum stays below 2^53 (127 * 127 * K for K < 5e11).
    """
    if xq.device.type == "cpu" and hasattr(torch, "_int_mm"):
        return torch._int_mm(xq, wq.t())
    return (xq.double() @ wq.double().t()).to(torch.int32)


# Rows at or below which the int8 kernel wins (decode); above it one bf16 copy of the weight, made per call and
# amortised over the rows, feeds the bf16 GEMM (prefill). qwen2lib's ``matmul_timings`` measures the paths.
INT8PACK_MAX_ROWS = 32


def int8pack_supports(in_features: int) -> bool:
    # aten._weight_int8pack_mm's CPU kernel walks K in steps of 16: any other K reads past each row
    # (NaN, garbage or a segfault in torch 2.13), so those shapes take the GEMM path.
    return in_features % 16 == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int8_weight_matmul(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A16: bf16 activations (M, K) times int8 weights (N, K), per-channel scales (N,) -> (M, N) fp32.

    Both paths compute round_bf16(sum_k bf16(x_k) * q_nk) * scale_n with fp32 accumulation (int8 -> bf16 is
    exact), so they agree to bf16 output precision. Few rows: ``aten._weight_int8pack_mm`` reads the int8
    weight in its kernel (4x fewer bytes than fp32: decode is memory-bound). Many rows: the matmul is
    compute-bound, so the weight is widened to bf16 once per call and the bf16 GEMM (AVX512-BF16/AMX)
    runs; without native bf16 that GEMM is emulated, so such CPUs keep the int8 kernel.
    The scale is applied in fp32 after the kernel: a bf16 scale would add its own rounding.
    """
    xb = x.to(torch.bfloat16).contiguous()
    rows, in_features = xb.shape
    native_bf16 = x.device.type == "cpu" and torch.cpu._is_avx512_bf16_supported()
    use_int8pack = x.device.type == "cpu" and int8pack_supports(in_features) and (
        rows <= INT8PACK_MAX_ROWS or not native_bf16)
    if use_int8pack:
        ones = torch.ones(wq.shape[0], dtype=torch.bfloat16, device=x.device)
        y = torch.ops.aten._weight_int8pack_mm(xb, wq, ones)  # (M, N) bf16
    else:
        y = F.linear(xb, wq.to(torch.bfloat16))  # (M, N) bf16
    return y.float() * scale.float()


class Int8Linear(nn.Module):
    """A Linear with int8 weights (N, K) and fp32 per-output-channel scales (N,), as buffers.

    ``activations="bf16"``: W8A16. ``activations="int8"``: W8A8 with per-token dynamic activation scales.
    The bias (Qwen2's q/k/v have one) stays fp32 and is added after rescaling.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, activations: str = "bf16"):
        super().__init__()
        if activations not in ("bf16", "int8"):
            raise QuantizationError(f"activations={activations!r}: use 'bf16' (W8A16) or 'int8' (W8A8)")
        self.in_features, self.out_features, self.activations = in_features, out_features, activations
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: str = "bf16") -> "Int8Linear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, activations)
        q, scale = quantize_weight(linear.weight)
        module.weight.copy_(q)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module.to(linear.weight.device)

    def realign(self) -> None:
        # Weights loaded from a safetensors mmap can start at any byte; the CPU int8 kernels read them with
        # aligned vector loads (a misaligned weight crashed _weight_int8pack_mm). Copy once into fresh memory.
        if self.weight.data_ptr() % 64 or not self.weight.is_contiguous():
            self.weight = self.weight.contiguous().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.realign()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.activations == "int8":
            xq, x_scale = quantize_per_token(x2)  # (M, K) int8, (M, 1)
            y = int8_matmul(xq.contiguous(), self.weight).float() * x_scale * self.weight_scale  # (M, N)
        else:
            y = int8_weight_matmul(x2, self.weight, self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={self.activations}"


class Int4Linear(nn.Module):
    """A Linear with 4-bit weights: packed ``weight`` uint8 (N, ceil(K / 2)), ``weight_scale`` fp32 and
    ``weight_zero_point`` uint8 (N, groups), as buffers. W4A16: the weight is dequantized and the matmul runs in
    the input's dtype (a reference for the compiled graph's MatMulNBits, not a fast torch path)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__()
        check_group_size(group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = -(-in_features // group_size)
        self.register_buffer("weight", torch.zeros(out_features, -(-in_features // 2), dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32))
        self.register_buffer("weight_zero_point", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE, importance=None,
                    quantized=None) -> "Int4Linear":
        """``quantized``: (q, scale, zero) already rounded (GPTQ); else ``quantize_int4`` of the weight."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        q, scale, zero = quantized if quantized is not None else quantize_int4(linear.weight, group_size, importance)
        module.weight.copy_(pack_int4(q))
        module.weight_scale.copy_(scale)
        module.weight_zero_point.copy_(zero)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module.to(linear.weight.device)

    def dequantized(self) -> torch.Tensor:
        """float32 (N, K)."""
        q = unpack_int4(self.weight, self.in_features)
        return dequantize_int4(q, self.weight_scale, self.weight_zero_point, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def is_int4_linear(module: nn.Module) -> bool:
    """True for an ``Int4Linear`` of any copy of this file."""
    return type(module).__name__ == "Int4Linear" and hasattr(module, "weight_zero_point")


def is_int8_linear(module: nn.Module) -> bool:
    """True for an ``Int8Linear`` of any copy of this file (a loaded package imports its own copy)."""
    return type(module).__name__ == "Int8Linear" and hasattr(module, "weight_scale")


# ---- loading a quantized package ---------------------------------------------------------------


def convert_to_int8_modules(model, quantization_config: Mapping) -> None:
    """Swap in empty ``Int8Linear`` / ``Int4Linear`` modules named by a saved ``quantization_config`` (weights
    load after)."""
    for name, kind in quantization_config["modules"].items():
        linear = model.get_submodule(name)
        parent_name, _, leaf = name.rpartition(".")
        if kind == "w4a16":
            module = Int4Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                quantization_config["group_size"])
        else:
            module = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                "int8" if kind == "w8a8" else "bf16")
        model.get_submodule(parent_name).__setattr__(leaf, module)
