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

lm_head (tied to the embeddings in small Qwen2) and the embeddings stay in float by default, as peers do.

The quantized package is the deploy package's code and tokenizer plus its own ``model.safetensors``
(``X.weight`` int8 (N, K), ``X.weight_scale`` fp32 (N,)), ``quantization_config`` in config.json and
``modeling_qwen2_int8.py``, whose ``Qwen2ForCausalLMInt8`` (the class ``auto_map`` names) swaps in
``Int8Linear`` modules before the weights load: ``AutoModelForCausalLM.from_pretrained(pkg,
trust_remote_code=True)`` returns the int8 model.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

try:  # inside qwen2lib a bad request is one of its one-line errors; alone, a plain ValueError
    from qwen2lib.errors import Qwen2LibError as _ErrorBase
except ImportError:
    class _ErrorBase(Exception):
        pass

SCHEMES = ("w8a16", "smoothquant")
QUANT_METHOD = "qwen2lib-int8"
DEFAULT_SKIP = ("lm_head",)
INT8_MODELING_FILE = "modeling_qwen2_int8.py"
INT8_CLASS = "Qwen2ForCausalLMInt8"
WEIGHTS_FILE = "model.safetensors"
STATS_FILE = "stats.safetensors"  # the calibration stage's statistics (notebook 02)
# Files of the deploy package a quantized package does not copy: its float weights, config and records.
NOT_COPIED = ("config.json", "metrics.json", "model.safetensors.index.json", ".qwen2lib-folder")
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
def smooth_model(model, stats: Mapping[str, torch.Tensor], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant factors into each layer's norms and the Linears they feed, in place (still float).

    The model computes the same function afterwards (up to fp32 rounding): norm(x) / s then W * s.
    Returns {"layers.{i}.{norm}": s}.
    """
    check_alpha(alpha)
    factors = {}
    for i, layer in enumerate(model.model.layers):
        for norm_name, linear_names in SMOOTH_GROUPS:
            norm = getattr(layer, norm_name)
            linears = [layer.get_submodule(n) for n in linear_names]
            act = stats_absmax(stats, f"model.layers.{i}.{linear_names[0]}")
            for n in linear_names[1:]:  # they read the same tensor; take the max in case stats differ
                act = torch.maximum(act, stats_absmax(stats, f"model.layers.{i}.{n}"))
            s = smoothing_factors(act, [lin.weight for lin in linears], alpha)
            norm.weight.div_(s.to(norm.weight.dtype))
            for lin in linears:
                lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
            factors[f"layers.{i}.{norm_name}"] = s
    return factors


# ---- quantize_model -----------------------------------------------------------------------------


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """A pattern skips a Linear when it equals (or fnmatch-es) its full name or its last component."""
    leaf = name.rsplit(".", 1)[-1]
    return any(name == p or leaf == p or fnmatch.fnmatchcase(name, p) for p in skip)


def smoothed_linear_names(model) -> set[str]:
    return {f"model.layers.{i}.{n}" for i in range(len(model.model.layers)) for _, names in SMOOTH_GROUPS for n in names}


@torch.no_grad()
def quantize_model(model, scheme: str = "w8a16", *, stats: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
                   alpha: float = 0.5, skip: Iterable[str] = DEFAULT_SKIP):
    """Replace the model's nn.Linear layers by ``Int8Linear`` in place and return the model.

    ``scheme``: "w8a16" or "smoothquant" (needs ``stats``: a calibration folder or its tensors).
    ``skip``: Linear names or patterns kept in float (default: lm_head). The applied settings are recorded
    in ``model.config.quantization_config``, which ``save_quantized`` writes to config.json.
    """
    if scheme not in SCHEMES:
        raise QuantizationError(f"scheme={scheme!r}: choose one of {', '.join(SCHEMES)}")
    skip = tuple(skip)
    int8_activations: set[str] = set()
    if scheme == "smoothquant":
        if stats is None:
            raise QuantizationError(
                "scheme='smoothquant' needs activation statistics: pass stats=<calibration folder> (from "
                "`qwen2lib calibrate`, notebook 02) or the dict of tensors it saved"
            )
        if not isinstance(stats, Mapping):
            stats = load_stats(stats)
        smooth_model(model, stats, alpha)
        int8_activations = {n for n in smoothed_linear_names(model) if not is_skipped(n, skip)}
    modules = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or is_skipped(name, skip):
            continue
        activations = "int8" if name in int8_activations else "bf16"
        parent_name, _, leaf = name.rpartition(".")
        model.get_submodule(parent_name).__setattr__(leaf, Int8Linear.from_linear(module, activations))
        modules[name] = "w8a8" if activations == "int8" else "w8a16"
    if not modules:
        raise QuantizationError(f"no nn.Linear left to quantize (skip={skip}): is the model already quantized?")
    config = {
        "quant_method": QUANT_METHOD,
        "scheme": scheme,
        "weights": "int8, symmetric, one fp32 scale per output channel",
        "activations": {"w8a16": "bf16", "w8a8": "int8, symmetric, dynamic per token"},
        "alpha": alpha if scheme == "smoothquant" else None,
        "skip": list(skip),
        "modules": modules,
    }
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = config
    return model


def convert_to_int8_modules(model, quantization_config: Mapping) -> None:
    """Swap in empty ``Int8Linear`` modules named by a saved ``quantization_config`` (weights load after)."""
    for name, kind in quantization_config["modules"].items():
        linear = model.get_submodule(name)
        parent_name, _, leaf = name.rpartition(".")
        module = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                            "int8" if kind == "w8a8" else "bf16")
        model.get_submodule(parent_name).__setattr__(leaf, module)


# ---- the quantized package ----------------------------------------------------------------------

# The template's import lines start with "{from_}": transformers reads every line of a package file that starts with
# "from ." as an import of the package's own modules, this file's text included.
INT8_MODELING_SOURCE = '''"""Int8 variant of the patched Qwen2ForCausalLM, written by {quantization_module}.py.

Before the weights load, the Linears that config.quantization_config lists become Int8Linear modules
(int8 weight + fp32 weight_scale buffers), so AutoModelForCausalLM.from_pretrained(package,
trust_remote_code=True) returns the int8 model.
"""
{from_} .{patched_module} import Qwen2ForCausalLM
{from_} .{quantization_module} import convert_to_int8_modules


class {cls}(Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        quantization_config = getattr(config, "quantization_config", None)
        if quantization_config:
            convert_to_int8_modules(self, quantization_config)
'''


def package_module(package: Path, prefix: str) -> str:
    """The module name of the package's ``<prefix>_<target>.py`` (the int8 modeling file aside)."""
    found = sorted(p.stem for p in Path(package).glob(f"{prefix}_*.py") if p.name != INT8_MODELING_FILE)
    if not found:
        raise QuantizationError(f"{package} holds no {prefix}_<target>.py: is it a deploy package (notebook 01)?")
    return found[0]


def int8_code(package: str | os.PathLike) -> dict[str, str]:
    """{INT8_MODELING_FILE: text}: the one Python file a quantized package adds to the deploy package's."""
    text = INT8_MODELING_SOURCE.format(patched_module=package_module(Path(package), "modeling_qwen2"),
                                       quantization_module=package_module(Path(package), "quantization"),
                                       cls=INT8_CLASS, from_="from")
    return {INT8_MODELING_FILE: text}


def int8_auto_map(deploy_auto_map: Mapping[str, str]) -> dict[str, str]:
    return dict(deploy_auto_map, AutoModelForCausalLM=f"{Path(INT8_MODELING_FILE).stem}.{INT8_CLASS}")


def state_dict_for_saving(model) -> dict[str, torch.Tensor]:
    """Every tensor once: a tied lm_head (it shares the embedding's storage) is left to the loader to re-tie."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().contiguous().cpu()
    return state


def save_quantized(model, out_dir: str | os.PathLike, deploy_package: str | os.PathLike | None = None) -> Path:
    """Write the quantized package into ``out_dir`` (created if missing; use an empty folder): the deploy
    package's code and tokenizer (``deploy_package``, by default the folder the model was loaded from), the int8
    modeling file, config.json with ``quantization_config``, and the weights."""
    src = Path(deploy_package or model.name_or_path)
    out = Path(out_dir)
    config = getattr(model.config, "quantization_config", None)
    if not config or config.get("quant_method") != QUANT_METHOD:
        raise QuantizationError("the model carries no quantization_config of this quantizer: call quantize() first")
    if not (src / "config.json").is_file():
        raise QuantizationError(f"{src} is not the deploy package folder: pass deploy_package=<its folder>")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():  # code, tokenizer and notes; not the float weights, the records or any symlink
        if f.is_file() and not f.is_symlink() and f.suffix != ".safetensors" and f.name not in NOT_COPIED:
            shutil.copy2(f, out / f.name)
    for name, text in int8_code(src).items():
        (out / name).write_text(text, encoding="utf-8")
    package_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    package_config["auto_map"] = int8_auto_map(package_config.get("auto_map") or {})
    package_config["architectures"] = [INT8_CLASS]
    package_config["quantization_config"] = config
    # The float tensors (embeddings, norms, biases, scales) are saved as the model holds them; "auto" loading
    # must not cast them to the checkpoint's original dtype (a bf16 checkpoint would get bf16 scales).
    float_dtypes = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    package_config["dtype"] = str(max(float_dtypes, key=lambda d: torch.finfo(d).bits)).removeprefix("torch.")
    package_config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(package_config, indent=2) + "\n", encoding="utf-8")
    save_file(state_dict_for_saving(model), str(out / WEIGHTS_FILE), metadata={"format": "pt", "quant_method": QUANT_METHOD})
    return out
