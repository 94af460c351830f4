"""The deploy package's quantizer: the project's one home for int8 weights, used by the torch package (notebook 03)
and by the graph builder (notebook 04) alike, so a weight quantized by either is the same bytes.

Every deploy package carries this file as ``quantization_<target>.py`` (byte for byte, under a one-line header),
and its ``Qwen2ForCausalLM.quantize()`` / ``save_quantized()`` call it, so a package quantizes and reloads where
only torch and transformers are installed. It therefore imports nothing from qwen2lib (but the optional error
base class, so that inside qwen2lib a bad request is a one-line error).

Weights: symmetric, zero point 0, q = round(w / scale) in [-127, 127], scale = max|w| / 127 over the group (a row,
or a block of a row). -128 is never produced and each weight is off by at most scale / 2; an all-zero group gets
scale 1.

W8A16     every Linear (but ``skip``) holds int8 weights, one fp32 scale per output channel. Activations stay
          16-bit: the matmul runs ``aten._weight_int8pack_mm`` on bf16 activations, the CPU kernel that reads int8
          weights directly (dequantising the whole weight on every call costs more than the fp32 matmul).
smoothquant  W8A8 for the Linears fed by an RMSNorm (q/k/v after ``input_layernorm``, gate/up after
          ``post_attention_layernorm``): a per-input-channel factor ``s_j = max|X_j|^a / max|W_j|^(1-a)`` from the
          calibration absmax moves activation outliers into the weights (X/s, W*s); the 1/s is folded into the
          norm's weight, so it costs nothing at run time. Activations are quantized per token, dynamically, and
          the product is int8 x int8 -> int32 (``torch._int_mm``), rescaled by (token scale x channel scale).
          o_proj and down_proj stay W8A16: no norm precedes them, so there is nowhere free to fold s, and their
          inputs carry the largest per-channel outliers, which per-token int8 without smoothing would clip.

W4A16     (``w4a16``: round to nearest; ``awq``: calibrated) every Linear (but ``skip``) holds 4-bit weights
          (0..15), asymmetric, one fp32 scale and one zero point per group of ``group_size`` inputs (default 128),
          dequantized for the matmul (activations stay float). ``awq`` uses the calibration's per-channel mean
          square E[X_j^2] (the diagonal of the input's second moment, so ``sum_j E[X_j^2] (W - W_q)_nj^2`` is the
          expected output error): per input shared by q|k|v, by gate|up and by down_proj, a scale
          ``s_j = rms(X_j)^a`` (a searched on a grid, a = 0 being round-to-nearest) multiplies W's columns before
          rounding and divides the input, folded into the RMSNorm before (q|k|v, gate|up) or into up_proj's rows
          (down_proj), as AWQ does; then each group's range is shrunk (clipped) by the factor that minimises the
          same weighted error. o_proj (its input is the attention output: with GQA no free place to fold) gets
          the clipping only.

lm_head (tied to the embeddings in small Qwen2) and the embeddings stay in float by default, as peers do.

The quantized package is the deploy package's code and tokenizer plus its own ``model.safetensors``
(``X.weight`` int8 (N, K), ``X.weight_scale`` fp32 (N,); int4: ``X.weight`` uint8 (N, ceil(K / 2)) two values per
byte, low nibble first, ``X.weight_scale`` fp32 and ``X.weight_zero_point`` uint8 (N, groups)), ``quantization_config`` in config.json and
``modeling_qwen2_int8.py``, whose ``Qwen2ForCausalLMInt8`` (the class ``auto_map`` names) swaps in
``Int8Linear`` modules before the weights load: ``AutoModelForCausalLM.from_pretrained(pkg,
trust_remote_code=True)`` returns the int8 model.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

try:  # inside qwen2lib a bad request is one of its one-line errors; alone, a plain ValueError
    from qwen2lib.errors import Qwen2LibError as _ErrorBase
except ImportError:
    class _ErrorBase(Exception):
        pass

INT8_SCHEMES = ("w8a16", "smoothquant")
INT4_SCHEMES = ("w4a16", "awq")
SCHEMES = INT8_SCHEMES + INT4_SCHEMES
DEFAULT_GROUP_SIZE = 128
AWQ_GRID = 20  # exponents a = 0, 1/20, ..., 1 tried per input
AWQ_SEARCH_ROWS = 1024  # the exponent is shared by all rows, so a strided sample of rows scores it (7B: 37,888)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # group range shrink factors tried per (row, group)
QUANT_METHOD = "qwen2lib-int8"
DEFAULT_SKIP = ("lm_head",)
STATS_FILE = "stats.safetensors"  # the calibration stage's statistics (notebook 02)
# Linears whose input is an RMSNorm's output, by the norm: the ones SmoothQuant can smooth for free.
SMOOTH_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)


class QuantizationError(_ErrorBase, ValueError):
    """A quantization request that cannot be carried out (unknown scheme, statistics that do not fit)."""


class MissingStatisticsError(_ErrorBase, FileNotFoundError):
    """No calibration statistics where they were asked for."""


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


def quantize_int4(weight, group_size: int = DEFAULT_GROUP_SIZE, importance=None):
    """(N, K) -> (uint8 q (N, K) in 0..15, fp32 scale (N, G), uint8 zero point (N, G)), G = ceil(K / group_size).

    ``importance`` (K,), e.g. E[X_j^2]: each (row, group) keeps the ``CLIP_RATIOS`` shrink of its range that
    minimises sum_j importance_j (w_j - w_q_j)^2 (AWQ's clipping); None: the full range (round to nearest)."""
    w, numpy_in = _as_tensor(weight)
    N, K = w.shape
    G = -(-K // group_size)
    groups = torch.zeros(N, G * group_size)
    groups[:, :K] = w
    groups = groups.reshape(N, G, group_size)
    best = _asymmetric4(groups)
    if importance is not None:
        h = torch.zeros(G * group_size)
        h[:K] = torch.as_tensor(importance).float()
        h = h.reshape(G, group_size)
        best_err = None
        for ratio in CLIP_RATIOS:
            q, scale, zero = candidate = _asymmetric4(groups, ratio)
            err = (((q.float() - zero[..., None].float()) * scale[..., None] - groups).square() * h).sum(-1)  # (N, G)
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
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE, importance=None) -> "Int4Linear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        q, scale, zero = quantize_int4(linear.weight, group_size, importance)
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


# ---- SmoothQuant --------------------------------------------------------------------------------


def load_stats(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The calibration statistics a calibration folder holds (``stats.safetensors``: ``<linear>.absmax`` ...)."""
    path = Path(folder) / STATS_FILE
    if not path.is_file():
        raise MissingStatisticsError(f"{path} does not exist: run the calibration stage first (`qwen2lib calibrate`, "
                                "notebook 02)")
    return load_file(str(path))


def stats_absmax(stats: Mapping[str, torch.Tensor], linear_name: str) -> torch.Tensor:
    """The calibration absmax (K,) of a Linear's input: ``stats["<name>.absmax"]`` or ``stats[name]``."""
    for key in (f"{linear_name}.absmax", linear_name):
        if key in stats:
            return stats[key].float()
    raise QuantizationError(
        f"the calibration statistics hold no input absmax for {linear_name!r}: were they collected on this "
        "model? Run `qwen2lib calibrate --model <this model>` (notebook 02) and pass its statistics."
    )


def smoothing_factors(act_absmax: torch.Tensor, weights: Iterable[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max_over_weights|W_:,j|^(1-alpha), (K,); 1 where either side is 0."""
    w_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)  # (K,)
    x = act_absmax.float().to(w_absmax.device)
    s = x.pow(alpha) / w_absmax.pow(1 - alpha)
    ok = (x > 0) & (w_absmax > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(min=1e-5)


def check_alpha(alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise QuantizationError(f"alpha={alpha}: the migration strength must lie in [0, 1] (SmoothQuant uses 0.5)")


@torch.no_grad()
def smooth_layer(layer, index: int, stats: Mapping[str, torch.Tensor], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant factors into decoder layer ``index``'s norms and the Linears they feed, in place (still
    float): the layer computes the same function afterwards (up to fp32 rounding): norm(x) / s then W * s.
    Returns {"layers.{index}.{norm}": s}."""
    factors = {}
    for norm_name, linear_names in SMOOTH_GROUPS:
        norm = getattr(layer, norm_name)
        linears = [layer.get_submodule(n) for n in linear_names]
        act = stats_absmax(stats, f"model.layers.{index}.{linear_names[0]}")
        for n in linear_names[1:]:  # they read the same tensor; take the max in case stats differ
            act = torch.maximum(act, stats_absmax(stats, f"model.layers.{index}.{n}"))
        s = smoothing_factors(act, [lin.weight for lin in linears], alpha)
        norm.weight.div_(s.to(norm.weight.dtype))
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
        factors[f"layers.{index}.{norm_name}"] = s
    return factors


def smooth_model(model, stats: Mapping[str, torch.Tensor], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """``smooth_layer`` on every decoder layer of a whole model. Returns {"layers.{i}.{norm}": s}."""
    check_alpha(alpha)
    factors = {}
    for i, layer in enumerate(model.model.layers):
        factors.update(smooth_layer(layer, i, stats, alpha))
    return factors


# ---- AWQ (activation-aware int4) ----------------------------------------------------------------


def stats_meansq(stats: Mapping[str, torch.Tensor], linear_name: str) -> torch.Tensor:
    """The calibration mean square E[X_j^2] (K,) of a Linear's input (``stats["<name>.meansq"]``)."""
    if f"{linear_name}.meansq" not in stats:
        raise QuantizationError(f"the calibration statistics hold no input mean square for {linear_name!r} (statistics "
                                "from before it was recorded?): recalibrate (`qwen2lib calibrate`, notebook 02)")
    return stats[f"{linear_name}.meansq"].float()


def weighted_int4_error(weight: torch.Tensor, meansq: torch.Tensor, group_size: int, s: torch.Tensor) -> float:
    """sum_nj E[X_j^2] (W - Q(W s) / s)_nj^2: the expected squared output error of rounding ``weight`` scaled by s."""
    w = weight.float()
    q, scale, zero = quantize_int4(w * s, group_size)
    return float(((w - dequantize_int4(q, scale, zero, group_size) / s).square() * meansq).sum())


def awq_factors(weights: Iterable[torch.Tensor], meansq: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per input channel s (K,) = rms(X_j)^a (normalised to a geometric mean of max and min of 1), a on a grid
    of ``AWQ_GRID`` + 1 values in [0, 1], the one with the least weighted error (a = 0: s = 1, round to nearest).
    The error is summed over at most ``AWQ_SEARCH_ROWS`` evenly strided rows: one exponent serves every row."""
    w = torch.cat([t.detach() for t in weights])  # (N, K): Linears reading the same input
    w = w[:: -(-w.shape[0] // AWQ_SEARCH_ROWS)].float()  # (<= AWQ_SEARCH_ROWS, K)
    rms = meansq.sqrt().clamp(min=1e-8)
    best, best_s = None, torch.ones_like(rms)
    for i in range(AWQ_GRID + 1):
        s = rms.pow(i / AWQ_GRID)
        s = s / (s.max() * s.min()).sqrt()
        err = weighted_int4_error(w, meansq, group_size, s)
        if best is None or err < best:
            best, best_s = err, s
    return best_s


@torch.no_grad()
def awq_layer(layer, index: int, stats: Mapping[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """Fold AWQ scales into decoder layer ``index`` in place (still float: it computes the same function up to
    fp32 rounding) and return, per Linear, the importance E[X_j^2] of its (now scaled) input for the clipping.

    down_proj first (its s divides up_proj's rows), then q|k|v and gate|up (their s divides the norm's weight);
    o_proj is left unscaled."""
    importance = {}
    p, mlp = f"model.layers.{index}", layer.mlp
    h = stats_meansq(stats, f"{p}.mlp.down_proj")
    s = awq_factors([mlp.down_proj.weight], h, group_size)
    mlp.up_proj.weight.div_(s.to(mlp.up_proj.weight.dtype)[:, None])
    mlp.down_proj.weight.mul_(s.to(mlp.down_proj.weight.dtype)[None, :])
    importance[f"{p}.mlp.down_proj"] = h / s.square()
    for norm_name, linear_names in SMOOTH_GROUPS:
        norm, linears = getattr(layer, norm_name), [layer.get_submodule(n) for n in linear_names]
        h = stats_meansq(stats, f"{p}.{linear_names[0]}")
        s = awq_factors([lin.weight for lin in linears], h, group_size)
        norm.weight.div_(s.to(norm.weight.dtype))
        for name, lin in zip(linear_names, linears):
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
            importance[f"{p}.{name}"] = h / s.square()
    importance[f"{p}.self_attn.o_proj"] = stats_meansq(stats, f"{p}.self_attn.o_proj")
    return importance


def awq_model(model, stats: Mapping[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """``awq_layer`` on every decoder layer of a whole model: {Linear name: importance of its input}."""
    importance = {}
    for i, layer in enumerate(model.model.layers):
        importance.update(awq_layer(layer, i, stats, group_size))
    return importance


# ---- quantize_model -----------------------------------------------------------------------------


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """A pattern skips a Linear when it equals (or fnmatch-es) its full name or its last component."""
    leaf = name.rsplit(".", 1)[-1]
    return any(name == p or leaf == p or fnmatch.fnmatchcase(name, p) for p in skip)


def check_settings(scheme: str, alpha: float = 0.5, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Refuse an unknown scheme, SmoothQuant's alpha outside [0, 1] or an int4 group size MatMulNBits cannot run
    (the stage and the CLI call it before anything is built)."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"scheme={scheme!r}: choose one of {', '.join(SCHEMES)}")
    if scheme == "smoothquant":
        check_alpha(alpha)
    if scheme in INT4_SCHEMES:
        check_group_size(group_size)


def check_request(scheme: str, stats, group_size: int, alpha: float = 0.5):
    """``check_settings``, then refuse a calibrated scheme without statistics; returns the statistics as tensors."""
    check_settings(scheme, alpha, group_size)
    if scheme not in ("smoothquant", "awq"):
        return stats
    if stats is None:
        raise QuantizationError(
            f"scheme={scheme!r} needs activation statistics: pass stats=<calibration folder> (from "
            "`qwen2lib calibrate`, notebook 02) or the dict of tensors it saved"
        )
    return stats if isinstance(stats, Mapping) else load_stats(stats)


def plan_modules(model, scheme: str, skip: Iterable[str]) -> dict[str, str]:
    """{Linear name: "w8a16" | "w8a8" | "w4a16"}: what ``scheme`` makes of each nn.Linear not skipped (works on a
    model on the ``meta`` device: names and types only)."""
    smoothed = {n for _, names in SMOOTH_GROUPS for n in names}
    plan = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or is_skipped(name, skip):
            continue
        in_layer = name.startswith("model.layers.") and name.split(".", 3)[3] in smoothed
        plan[name] = ("w4a16" if scheme in INT4_SCHEMES else
                      "w8a8" if scheme == "smoothquant" and in_layer else "w8a16")
    if not plan:
        raise QuantizationError(f"no nn.Linear left to quantize (skip={tuple(skip)}): is the model already quantized?")
    return plan


def quantized_module(linear: nn.Linear, kind: str, group_size: int, importance=None) -> nn.Module:
    if kind == "w4a16":
        return Int4Linear.from_linear(linear, group_size, importance)
    return Int8Linear.from_linear(linear, "int8" if kind == "w8a8" else "bf16")


def replace_linears(root: nn.Module, prefix: str, plan: Mapping[str, str], group_size: int,
                    importance: Mapping[str, torch.Tensor] | None = None) -> None:
    """Swap the Linears of ``root`` (whose name in the model is ``prefix``) that ``plan`` names for their
    quantized modules, in place."""
    for name, module in list(root.named_modules()):
        full = f"{prefix}.{name}" if prefix and name else prefix or name
        if full in plan and isinstance(module, nn.Linear):
            new = quantized_module(module, plan[full], group_size, (importance or {}).get(full))
            parent_name, _, leaf = name.rpartition(".")
            root.get_submodule(parent_name).__setattr__(leaf, new)


@torch.no_grad()
def quantize_layer(layer, index: int, scheme: str, plan: Mapping[str, str], *, stats=None, alpha: float = 0.5,
                   group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Quantize decoder layer ``index`` in place: fold SmoothQuant / AWQ scales (their schemes), then swap in the
    ``plan``'s quantized modules. The unit both ``quantize_model`` and ``quantize_checkpoint`` run."""
    importance = {}
    if scheme == "smoothquant":
        smooth_layer(layer, index, stats, alpha)
    elif scheme == "awq":
        importance = awq_layer(layer, index, stats, group_size)
    replace_linears(layer, f"model.layers.{index}", plan, group_size, importance)


def quantization_config(scheme: str, plan: Mapping[str, str], *, alpha: float, group_size: int,
                        skip: Iterable[str]) -> dict:
    """The ``quantization_config`` a quantized package's config.json carries (what ``convert_to_int8_modules``
    reads back)."""
    int4 = scheme in INT4_SCHEMES
    return {
        "quant_method": QUANT_METHOD,
        "scheme": scheme,
        "weights": (f"int4 asymmetric, one fp32 scale and uint8 zero point per group of {group_size} inputs" if int4
                    else "int8, symmetric, one fp32 scale per output channel"),
        "activations": ({"w4a16": "float (weights dequantized)"} if int4 else
                        {"w8a16": "bf16", "w8a8": "int8, symmetric, dynamic per token"}),
        "alpha": alpha if scheme == "smoothquant" else None,
        "group_size": group_size if int4 else None,
        "skip": list(skip),
        "modules": dict(plan),
    }


@torch.no_grad()
def quantize_model(model, scheme: str = "w8a16", *, stats: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
                   alpha: float = 0.5, skip: Iterable[str] = DEFAULT_SKIP, group_size: int = DEFAULT_GROUP_SIZE):
    """Replace the model's nn.Linear layers by ``Int8Linear`` (or ``Int4Linear``) in place and return the model.

    ``scheme``: "w8a16", "smoothquant" (needs ``stats``: a calibration folder or its tensors), "w4a16" (int4,
    round to nearest, groups of ``group_size`` inputs) or "awq" (int4, needs ``stats``). ``skip``: Linear names
    or patterns kept in float (default: lm_head). The applied settings are recorded in
    ``model.config.quantization_config``, which ``save_quantized`` writes to config.json. The whole model is in
    memory; ``quantize_checkpoint`` does the same one decoder layer at a time.
    """
    skip = tuple(skip)
    stats = check_request(scheme, stats, group_size, alpha)
    plan = plan_modules(model, scheme, skip)
    for i, layer in enumerate(model.model.layers):
        quantize_layer(layer, i, scheme, plan, stats=stats, alpha=alpha, group_size=group_size)
    replace_linears(model, "", {n: k for n, k in plan.items() if not n.startswith("model.layers.")}, group_size)
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = quantization_config(scheme, plan, alpha=alpha, group_size=group_size,
                                                               skip=skip)
    return model


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
