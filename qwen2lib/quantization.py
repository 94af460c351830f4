"""Stage 3: int8 weights for the deploy package, two schemes, measured against the fp32 reference.

W8A16     every Linear (but ``skip``) holds int8 weights, symmetric, one fp32 scale per output channel.
          Activations stay 16-bit: the matmul runs ``aten._weight_int8pack_mm`` on bf16 activations, the
          CPU kernel that reads int8 weights directly. Dequantising the whole weight to fp32 on every
          call costs more than the fp32 matmul it replaces (see ``matmul_timings``), so it is not used.
smoothquant  W8A8 for the Linears fed by an RMSNorm (q/k/v after ``input_layernorm``, gate/up after
          ``post_attention_layernorm``): a per-input-channel factor ``s_j = max|X_j|^a / max|W_j|^(1-a)``
          from the calibration absmax moves activation outliers into the weights (X/s, W*s) and the 1/s
          is folded into the norm's weight, so it costs nothing at run time. Activations are quantized per
          token, dynamically (absmax of each row / 127), and the product is int8 x int8 -> int32
          (``torch._int_mm``), rescaled by (token scale x channel scale).
          o_proj and down_proj stay W8A16: no norm precedes them, so there is nowhere free to fold s
          (down_proj's could go into up_proj's rows, o_proj's into v_proj's rows only when every query
          head of a kv group shares it), and their inputs -- the attention output and the SwiGLU product --
          carry the largest per-channel outliers, which per-token int8 without smoothing would clip.

lm_head (tied to the embeddings in small Qwen2) and the embeddings are kept in fp32 by default, as peers do.

The quantized package is a copy of the deploy package with its own ``model.safetensors`` (``X.weight`` int8
(N, K), ``X.weight_scale`` fp32 (N,), everything else as before), ``quantization_config`` in config.json and
``modeling_qwen2_int8.py``, whose ``Qwen2ForCausalLMInt8`` (the class ``auto_map`` names) swaps in
``Int8Linear`` modules before the weights load. So ``AutoModelForCausalLM.from_pretrained(pkg,
trust_remote_code=True)`` returns the int8 model directly; that file imports ``qwen2lib.quantization``
(as the patched ``quantize()`` does). ``load_quantized(pkg)`` is the same call, with transformers' warning
about the (to it) unknown ``quant_method`` silenced.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from .artifacts import MARKER, default_workdir, read_metrics, stage_dir
from .calibration import describe as describe_calibration, ensure_calibration, load_stats
from .errors import Qwen2LibError
from .int8 import dequantize_weight, quantize_per_token, quantize_weight
from .fidelity import fidelity_report, fidelity_table, heldout_blocks as make_heldout_blocks, per_layer_sqnr
from .deploy import (ensure_patched, load_deploy_package, package_auto_map, package_target,
                     verify_package_code)
from .stages import ensure_stage, recorded_request

SCHEMES = ("w8a16", "smoothquant")
QUANT_METHOD = "qwen2lib-int8"
DEFAULT_SKIP = ("lm_head",)
INT8_MODELING_FILE = "modeling_qwen2_int8.py"
INT8_CLASS = "Qwen2ForCausalLMInt8"
WEIGHTS_FILE = "model.safetensors"
# Linears whose input is an RMSNorm's output, by the norm: the ones SmoothQuant can smooth for free.
SMOOTH_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)


class QuantizationError(Qwen2LibError, ValueError):
    """A quantization request that cannot be carried out (unknown scheme, missing statistics)."""


# ---- int8 weights ------------------------------------------------------------------------------


def int8_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) x int8 (N, K)^T -> int32 (M, N), exactly.

    ``torch._int_mm`` on CPU (VNNI); elsewhere an emulation in float64, which is exact because every
    partial sum stays below 2^53 (127 * 127 * K for K < 5e11).
    """
    if xq.device.type == "cpu" and hasattr(torch, "_int_mm"):
        return torch._int_mm(xq, wq.t())
    return (xq.double() @ wq.double().t()).to(torch.int32)


# Rows at or below which the int8 kernel wins (decode); above it one bf16 copy of the weight, made per call and
# amortised over the rows, feeds the bf16 GEMM (prefill). Measured on 896 x 4864 (see matmul_timings).
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


# ---- SmoothQuant --------------------------------------------------------------------------------


def stats_absmax(stats: Mapping[str, torch.Tensor], linear_name: str) -> torch.Tensor:
    """The calibration absmax (K,) of a Linear's input: ``stats["<name>.absmax"]`` (calibration.py) or ``stats[name]``."""
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


@torch.no_grad()
def smooth_model(model, stats: Mapping[str, torch.Tensor], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant factors into each layer's norms and the Linears they feed, in place (still float).

    The model computes the same function afterwards (up to fp32 rounding): norm(x) / s then W * s.
    Returns {"layers.{i}.{norm}": s}.
    """
    if not 0 <= alpha <= 1:
        raise QuantizationError(f"alpha={alpha}: the migration strength must lie in [0, 1] (SmoothQuant uses 0.5)")
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

INT8_MODELING_SOURCE = '''"""Int8 variant of the patched Qwen2ForCausalLM, written by qwen2lib.quantization.

Before the weights load, the Linears that config.quantization_config lists become
qwen2lib.quantization.Int8Linear (int8 weight + fp32 weight_scale buffers), so
AutoModelForCausalLM.from_pretrained(package, trust_remote_code=True) returns the int8 model.
"""
from .{patched_module} import Qwen2ForCausalLM


class {cls}(Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        from qwen2lib.quantization import convert_to_int8_modules

        quantization_config = getattr(config, "quantization_config", None)
        if quantization_config:
            convert_to_int8_modules(self, quantization_config)
'''


def patched_modeling_module(package: Path) -> str:
    found = sorted(p.stem for p in package.glob("modeling_qwen2_*.py") if p.name != INT8_MODELING_FILE)
    if not found:
        raise QuantizationError(f"{package} holds no modeling_qwen2_<target>.py: is it a deploy package (notebook 01)?")
    return found[0]


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


def int8_code(package: Path) -> dict[str, str]:
    """{INT8_MODELING_FILE: text}: the one Python file a quantized package adds to the deploy package's."""
    return {INT8_MODELING_FILE: INT8_MODELING_SOURCE.format(patched_module=patched_modeling_module(package),
                                                            cls=INT8_CLASS)}


def int8_auto_map(package: Path) -> dict[str, str]:
    config = json.loads((package / "config.json").read_text(encoding="utf-8"))
    return dict(config.get("auto_map") or {}, AutoModelForCausalLM=f"{Path(INT8_MODELING_FILE).stem}.{INT8_CLASS}")


def verify_quantized_code(package: str | os.PathLike) -> dict[str, str]:
    """``verify_package_code`` for a quantized package: its files are the deploy package's plus the int8 one."""
    package = Path(package)
    target = package_target(package)
    auto_map = dict(package_auto_map(target), AutoModelForCausalLM=f"{Path(INT8_MODELING_FILE).stem}.{INT8_CLASS}")
    return verify_package_code(package, int8_code(package), auto_map)


def save_quantized(model, deploy_package: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the quantized package into ``out_dir`` (created if missing; use an empty folder): see the module doc."""
    src, out = Path(deploy_package), Path(out_dir)
    config = getattr(model.config, "quantization_config", None)
    if not config or config.get("quant_method") != QUANT_METHOD:
        raise QuantizationError("the model carries no qwen2lib quantization_config: call quantize_model() first")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():  # code, tokenizer and notes; not the fp32 weights, the metrics or any symlink
        if f.is_file() and not f.is_symlink() and f.suffix != ".safetensors" and f.name not in (
                "config.json", "metrics.json", "model.safetensors.index.json", MARKER):
            shutil.copy2(f, out / f.name)
    for name, text in int8_code(src).items():
        (out / name).write_text(text, encoding="utf-8")
    package_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    package_config["auto_map"] = int8_auto_map(src)
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


def load_quantized(package_dir: str | os.PathLike, **kwargs):
    """The int8 model of a quantized package (eval mode); transformers' unknown-quant_method warning silenced."""
    verify_quantized_code(package_dir)
    quantizers_logger = hf_logging.get_logger("transformers.quantizers.auto")
    level = quantizers_logger.level
    quantizers_logger.setLevel(hf_logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(package_dir), trust_remote_code=True, **kwargs)
    finally:
        quantizers_logger.setLevel(level)
    return model.eval()


# ---- sizes and timings --------------------------------------------------------------------------


def memory_bytes(model) -> int:
    """Bytes of every parameter and buffer, shared storage (tied embeddings) counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def linear_bytes(model) -> int:
    """Bytes held by the Linear layers (float or int8) but lm_head: the part quantization shrinks."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Int8Linear)) and not name.endswith("lm_head"):
            total += sum(t.untyped_storage().nbytes() for t in list(module.parameters()) + list(module.buffers()))
    return total


def disk_bytes(folder: str | os.PathLike) -> int:
    """Bytes of a folder's *.safetensors (symlinks followed: a deploy package links the checkpoint's)."""
    return sum(p.resolve().stat().st_size for p in Path(folder).glob("*.safetensors"))


def size_table(sizes: Mapping[str, Mapping[str, int]]):
    """{label: {"disk_bytes", "memory_bytes"[, "linear_bytes"]}} -> DataFrame in MiB, with ratios to the first row."""
    import pandas as pd

    columns = {"disk_bytes": "on disk (MiB)", "memory_bytes": "in memory (MiB)", "linear_bytes": "Linear layers (MiB)"}
    rows = {label: {title: s[key] / 2**20 for key, title in columns.items() if key in s} for label, s in sizes.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    first = table.iloc[0]
    for title in list(table.columns):
        table[title.replace(" (MiB)", " vs first")] = table[title] / first[title]
    return table


def _median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


@torch.no_grad()
def matmul_timings(in_features: int = 896, out_features: int = 4864, tokens: Iterable[int] = (1, 512),
                   repeats: int = 10, seed: int = 0, threads: int | None = 1):
    """Median ms of one Linear's matmul, each way this module could run it, at each token count (CPU).

    fp32 F.linear; "dequantise then fp32" (the slow path this module avoids); W8A16 (bf16 x int8 kernel);
    W8A8 (per-token int8 + int32 matmul). ``threads=1`` by default: on a shared machine a multi-threaded
    single-token call mostly measures how long the scheduler takes to wake the second thread (we saw ~12 ms
    steps). ``None`` keeps torch's setting. Compare within one call only.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _matmul_timings(in_features, out_features, tuple(tokens), repeats, seed)
    finally:
        torch.set_num_threads(previous)


def _matmul_timings(in_features, out_features, tokens, repeats, seed):
    import pandas as pd

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    lin = nn.Linear(in_features, out_features, bias=False)
    lin.weight.copy_(w)
    w8a16, w8a8 = Int8Linear.from_linear(lin, "bf16"), Int8Linear.from_linear(lin, "int8")
    rows = []
    for t in tokens:
        x = torch.randn(t, in_features, generator=g)
        rows.append({
            "tokens": t,
            "fp32 F.linear": _median_ms(lambda: F.linear(x, w), repeats),
            "dequantise + fp32": _median_ms(lambda: F.linear(x, dequantize_weight(w8a16.weight, w8a16.weight_scale)), repeats),
            "W8A16 int8pack (bf16 x)": _median_ms(lambda: w8a16(x), repeats),
            "W8A8 _int_mm (per-token x)": _median_ms(lambda: w8a8(x), repeats),
        })
    return pd.DataFrame(rows).set_index("tokens")


# ---- the stage ----------------------------------------------------------------------------------


def logits_fn(model):
    """ids (B, T) -> fp32 logits (B, T, V), no cache: the callable the fidelity report compares."""

    @torch.no_grad()
    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(ids, use_cache=False).logits.float()

    return run


def check_request(scheme: str, alpha: float) -> None:
    """Refuse a bad scheme or alpha before any stage is built."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"scheme={scheme!r}: choose one of {', '.join(SCHEMES)}")
    if not 0 <= alpha <= 1:
        raise QuantizationError(f"alpha={alpha}: the migration strength must lie in [0, 1] (SmoothQuant uses 0.5)")


def calibration_to_use(workdir: Path, out: Path, calibration: Mapping | None) -> dict:
    """What to ask the calibration stage for: the settings given; none given: 02's statistics as they are,
    or, when calibration/ was deleted, the request this package was last built with."""
    if calibration:
        return dict(calibration)
    if (stage_dir(workdir, "calibration") / "metrics.json").is_file():
        return {}
    previous = (recorded_request(out) or {}).get("calibration") or {}
    return {k: previous[k] for k in ("dataset", "data_path", "samples", "seq_len", "percentile", "batch_size")
            if k in previous}


DEFAULT_SETTINGS = {"alpha": 0.5, "skip": list(DEFAULT_SKIP), "heldout_blocks": 4, "heldout_len": 64}


def quantize_settings(out: Path, **asked) -> dict:
    """The settings asked for; those left None keep what the package in ``out`` was built with (so notebook 05
    reuses notebook 03's package), else the defaults."""
    existing = recorded_request(out) or {}
    return {k: asked[k] if asked.get(k) is not None else existing.get(k) if existing.get(k) is not None else default
            for k, default in DEFAULT_SETTINGS.items()}


def ensure_quantized(model: str = "tiny", weights: str = "auto", workdir: str | os.PathLike | None = None, *,
                     scheme: str = "w8a16", alpha: float | None = None, seed: int = 0,
                     skip: Iterable[str] | None = None, heldout_blocks: int | None = None,
                     heldout_len: int | None = None, calibration: Mapping | None = None,
                     force: bool = False, verbose: bool = True) -> Path:
    """``<workdir>/quantized/<scheme>/``: the deploy package's own ``quantize()`` run with notebook 02's
    statistics, saved as a quantized package, with a metrics.json holding the fidelity report vs the fp32
    deploy package on held-out blocks, per-layer SQNR, the sizes and the activation outliers the statistics
    show. Reused when nothing it depends on changed (``qwen2lib.stages``).

    ``calibration``: settings for ``ensure_calibration`` (dataset, data_path, samples, ...); None uses the
    existing calibration as it is. Other settings left None keep the existing package's (``quantize_settings``).
    """
    workdir = Path(workdir) if workdir else default_workdir(model)
    out = stage_dir(workdir, "quantized", scheme)
    settings = quantize_settings(out, alpha=alpha, skip=None if skip is None else list(skip),
                                 heldout_blocks=heldout_blocks, heldout_len=heldout_len)
    alpha, skip = settings["alpha"], tuple(settings["skip"])
    heldout_blocks, heldout_len = settings["heldout_blocks"], settings["heldout_len"]
    check_request(scheme, alpha)
    package = ensure_patched(model, weights, workdir, seed=seed, verbose=verbose)
    calibration_dir = ensure_calibration(model, weights, workdir, seed=seed, verbose=verbose,
                                         **calibration_to_use(workdir, out, calibration))
    if verbose:
        print(f"[quantized] {describe_calibration(calibration_dir)}", file=sys.stderr, flush=True)
    request = {"scheme": scheme, "alpha": alpha if scheme == "smoothquant" else None, "skip": list(skip),
               "heldout_blocks": heldout_blocks, "heldout_len": heldout_len, "seed": seed,
               "calibration": recorded_request(calibration_dir)}

    def build(tmp: Path) -> dict:
        reference = load_deploy_package(package, torch.float32)
        candidate = load_deploy_package(package, torch.float32)
        for model in (reference, candidate):  # the fidelity report scores every position; the saved package
            model.config.insert_slice = False  # keeps the deploy package's insert_slice (its config.json)
        stats = load_stats(calibration_dir)
        started = time.perf_counter()
        candidate.quantize(scheme, stats=stats, alpha=alpha, skip=skip)  # the package's entry point
        quantize_s = time.perf_counter() - started
        blocks = make_heldout_blocks(AutoTokenizer.from_pretrained(str(package)), heldout_blocks, heldout_len, seed=seed)
        report = fidelity_report(logits_fn(reference), logits_fn(candidate), blocks, batch_size=1)
        sqnr = per_layer_sqnr(reference, candidate, blocks[:1])
        save_quantized(candidate, package, tmp)
        sizes = {label: {"disk_bytes": disk_bytes(folder), "memory_bytes": memory_bytes(m), "linear_bytes": linear_bytes(m)}
                 for label, folder, m in (("fp32", package, reference), (scheme, tmp, candidate))}
        # the reference runs in fp32, but its bytes on disk are the checkpoint as shipped (often bf16)
        package_config = json.loads((package / "config.json").read_text(encoding="utf-8"))
        sizes["fp32"]["disk_dtype"] = package_config.get("dtype") or package_config.get("torch_dtype")
        return {
            "request": request, "generated_code": verify_quantized_code(tmp), "scheme": scheme,
            "deploy_package": str(package), "calibration": str(calibration_dir),
            "calibration_data": read_metrics(calibration_dir)["dataset"],
            "quantization_config": candidate.config.quantization_config,
            "activation_outliers": activation_outliers(stats),
            "fidelity": report, "sqnr_db": sqnr, "sizes": sizes, "quantize_s": quantize_s,
            "heldout": {"blocks": heldout_blocks, "tokens_per_block": heldout_len,
                        "text": "stdlib held-out files (qwen2lib.corpus), never trained on"},
        }

    return ensure_stage("quantized", out, request, {"patched": package, "calibration": calibration_dir}, build,
                        force=force, verbose=verbose)


# The graph's projections and the Linear whose input each one reads (q|k|v share one input, gate|up another).
PROJECTION_INPUTS = {"qkv_proj": "self_attn.q_proj", "o_proj": "self_attn.o_proj", "gate_up_proj": "mlp.gate_proj",
                     "down_proj": "mlp.down_proj"}
# With one int8 scale per call, the scale follows the largest channel: a channel r times smaller than it keeps
# 127 / r levels, about log2(r) bits fewer. Past 2 bits (r = 4) the int8 graph keeps that projection's
# activations quantized per block of inputs instead, which follows the outlier only inside its own block.
OUTLIER_RATIO_FOR_PER_BLOCK = 4.0


def activation_outliers(stats: Mapping[str, torch.Tensor]) -> dict:
    """Per graph projection: the largest (max / median channel absmax) over layers of its input, and the
    decision it implies for the int8 graph (``per_block_projections`` of ``qwen2_int8.yaml``'s ``auto``)."""
    ratios = {}
    for projection, linear in PROJECTION_INPUTS.items():
        worst, i = 0.0, 0
        while f"model.layers.{i}.{linear}.absmax" in stats:
            a = stats[f"model.layers.{i}.{linear}.absmax"].float()
            median = float(a.median())
            worst = max(worst, float(a.max()) / median if median > 0 else float("inf"))
            i += 1
        ratios[projection] = worst
    return {"max_over_median": ratios, "threshold": OUTLIER_RATIO_FOR_PER_BLOCK,
            "per_block_projections": [p for p, r in ratios.items() if r >= OUTLIER_RATIO_FOR_PER_BLOCK]}


# ---- command line -------------------------------------------------------------------------------


def cmd_quantize(args) -> int:
    from .cli import workdir_of

    check_request(args.scheme, 0.5 if args.alpha is None else args.alpha)  # before any stage is built
    calibration = {k: v for k, v in (("dataset", args.dataset), ("data_path", args.data_path),
                                     ("samples", args.samples), ("seq_len", args.seq_len)) if v is not None}
    out = ensure_quantized(args.model, args.weights, workdir_of(args), scheme=args.scheme, alpha=args.alpha,
                           seed=args.seed, skip=args.skip, heldout_blocks=args.heldout_blocks,
                           heldout_len=args.heldout_len, calibration=calibration, force=args.force)
    metrics = read_metrics(out)
    print(fidelity_table({args.scheme: metrics["fidelity"]}).T.to_string())
    print(size_table(metrics["sizes"]).to_string())
    print(out)
    return 0


def register_cli(sub) -> None:
    from .calibration import add_calibration_set_args  # noqa: the CLI helpers live with their stage
    from .cli import add_model_args

    p = sub.add_parser("quantize", help="int8 weights (w8a16) or SmoothQuant W8A8 for the deploy package, with a fidelity report")
    add_model_args(p)
    p.add_argument("--scheme", default="w8a16", choices=SCHEMES)
    p.add_argument("--alpha", type=float, default=None, help="SmoothQuant migration strength in [0, 1] (default "
                   "0.5; unset settings keep the existing package's)")
    p.add_argument("--skip", nargs="*", default=None, help=f"Linear names/patterns kept in float (default {DEFAULT_SKIP})")
    add_calibration_set_args(p)
    p.add_argument("--heldout-blocks", type=int, default=None, help="held-out blocks for the fidelity report (4)")
    p.add_argument("--heldout-len", type=int, default=None, help="tokens per held-out block (64)")
    p.add_argument("--force", action="store_true", help="rebuild even when a matching package exists")
    p.set_defaults(func=cmd_quantize)
