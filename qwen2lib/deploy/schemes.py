"""The deploy package's quantization schemes, on the int8/int4 numbers of ``quantizer.py``: which Linear gets what,
SmoothQuant from the calibration statistics (notebook 02), AWQ and GPTQ from its token blocks, and
``quantize_model``, the package's ``Qwen2ForCausalLM.quantize()``. Every deploy package carries this file as ``schemes_<target>.py``, byte for byte
but its import of the quantizer, which there names ``.quantization_<target>``.

w8a16     every Linear (but ``skip``) holds int8 weights, one fp32 scale per output channel; activations stay
          16-bit.
smoothquant  W8A8 for the Linears fed by an RMSNorm (q/k/v after ``input_layernorm``, gate/up after
          ``post_attention_layernorm``): a per-input-channel factor ``s_j = max|X_j|^a / max|W_j|^(1-a)`` from the
          calibration absmax moves activation outliers into the weights (X/s, W*s); the 1/s is folded into the
          norm's weight, so it costs nothing at run time. Activations are quantized per token, dynamically.
          o_proj and down_proj stay W8A16: no norm precedes them, so there is nowhere free to fold s, and their
          inputs carry the largest per-channel outliers, which per-token int8 without smoothing would clip.
w4a16     every Linear (but ``skip``) holds 4-bit weights, round to nearest, groups of ``group_size`` inputs.
awq       int4, calibrated on activations like gptq (below): the calibration blocks run through the model one
          decoder layer at a time, and each layer's inputs give H = E[x x^T]. Per input (shared by q|k|v, by
          gate|up; down_proj's; o_proj's) a scale ``s_j = rms(X_j)^a`` multiplies W's columns before rounding and
          divides the input, a searched on a grid (a = 0 is round-to-nearest) for the least output error
          tr(dW H dW^T) of the rounded weight; s is folded into the RMSNorm before (q|k|v, gate|up), into
          up_proj's rows (down_proj) or into v_proj's rows (o_proj: s shared by the query heads that read one
          key/value head, so GQA's sharing survives), as AWQ does. Then each group's range is shrunk (clipped) by
          the factor that minimises that group's output error under its block of H, and the blocks go on through
          the rounded layer.
gptq      int4, calibrated on activations, not statistics: the calibration blocks (their token ids, saved with the
          statistics) run through the model one decoder layer at a time, as GPTQ does. Each layer's Linears get
          their input's second moment H = E[x x^T] from the blocks (inputs computed by the layers already
          quantized), are rounded by ``quantizer.gptq_int4`` (each column's error spread over the columns not yet
          rounded, through H^-1), and the blocks then go on through the quantized layer. Storing H from the
          calibration stage would not scale (at 7B one down_proj's is 18,944^2 floats): it lives one layer long.

lm_head (tied to the embeddings in small Qwen2) and the embeddings stay in float by default, as peers do.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn as nn
from safetensors.torch import load_file

from .quantizer import (DEFAULT_GROUP_SIZE, Int4Linear, Int8Linear, QuantizationError, _ErrorBase, check_group_size,
                        dequantize_int4, gptq_int4, quantize_int4)

INT8_SCHEMES = ("w8a16", "smoothquant")
INT4_SCHEMES = ("w4a16", "awq", "gptq")
CALIBRATED_SCHEMES = ("smoothquant", "awq", "gptq")
SCHEMES = INT8_SCHEMES + INT4_SCHEMES
QUANT_METHOD = "qwen2lib-int8"
DEFAULT_SKIP = ("lm_head",)
AWQ_GRID = 20  # exponents a = 0, 1/20, ..., 1 tried per input
AWQ_SEARCH_ROWS = 256  # the exponent is shared by all rows, so a strided sample of rows scores it (each K^2 flops)
STATS_FILE = "stats.safetensors"  # the calibration stage's statistics (notebook 02)
CALIBRATION_IDS = "calibration.input_ids"  # (N, L) token blocks the statistics came from, saved beside them
GPTQ_BATCH = 8  # calibration blocks run through a layer at a time (GPTQ and AWQ)
LAYERWISE_SCHEMES = ("awq", "gptq")  # quantized against activations, one decoder layer at a time
# Linears whose input is an RMSNorm's output, by the norm: the ones SmoothQuant can smooth for free.
SMOOTH_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)


def input_source(name: str) -> str:
    """The Linear (within a layer) whose input ``name`` reads: q|k|v share q_proj's, gate|up gate_proj's."""
    return next((group[0] for _, group in SMOOTH_GROUPS if name in group), name)


class MissingStatisticsError(_ErrorBase, FileNotFoundError):
    """No calibration statistics where they were asked for."""


# ---- calibration statistics --------------------------------------------------------------------------------


def load_stats(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The calibration statistics a calibration folder holds (``stats.safetensors``: ``<linear>.absmax`` ...)."""
    path = Path(folder) / STATS_FILE
    if not path.is_file():
        raise MissingStatisticsError(f"{path} does not exist: run the calibration stage first (`qwen2lib calibrate`, "
                                "notebook 02)")
    return load_file(str(path))


# ---- SmoothQuant --------------------------------------------------------------------------------


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


# ---- GPTQ (int4 rounded against the calibration activations) ------------------------------------


def layer_inputs(base, config, rotary, hidden: torch.Tensor) -> dict:
    """What every decoder layer takes besides (B, T, D) hidden states starting at position 0: the causal mask
    per layer type (the deploy package's ``causal_mask_for``) and the rotary cos/sin."""
    position_ids = torch.arange(hidden.shape[1])[None]  # (1, T)
    masks = {kind: base.causal_mask_for(kind, None, hidden, 0, None) for kind in dict.fromkeys(config.layer_types)}
    return {"masks": masks, "position_ids": position_ids, "rope": rotary(hidden, position_ids)}


def run_decoder_layer(layer, layer_type: str, hidden: torch.Tensor, extra: Mapping) -> torch.Tensor:
    """(B, T, D) -> (B, T, D): one decoder layer, no cache."""
    out = layer(hidden, attention_mask=extra["masks"][layer_type], position_embeddings=extra["rope"],
                position_ids=extra["position_ids"], use_cache=False)
    return out[0] if isinstance(out, tuple) else out


class CalibrationRun:
    """The calibration blocks' hidden states on their way through the model, one decoder layer at a time."""

    def __init__(self, base, config, rotary, embedded: torch.Tensor):
        """``embedded``: (N, L, D) embedding rows of the blocks; ``base``: the model's decoder (its mask code)."""
        if not hasattr(base, "causal_mask_for"):
            raise QuantizationError("awq and gptq run the deploy package's model (it needs its causal_mask_for): "
                                    "load the model from the deploy package (notebook 01, `qwen2lib patch`)")
        self.config = config
        self.hidden = list(embedded.float().split(GPTQ_BATCH))  # [(B, L, D)]
        self.extra = layer_inputs(base, config, rotary, self.hidden[0])  # every block has the same length

    def run(self, layer, index: int, advance: bool) -> None:
        """Every batch through ``layer``; ``advance``: keep the outputs as the next layer's inputs."""
        kind = self.config.layer_types[index]
        outputs = [run_decoder_layer(layer, kind, h, self.extra) for h in self.hidden]
        if advance:
            self.hidden = outputs


def calibration_ids(stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if CALIBRATION_IDS not in stats:
        raise QuantizationError("the calibration statistics hold no token blocks (statistics from before they were "
                                "saved?): recalibrate (`qwen2lib calibrate`, notebook 02) for gptq")
    return stats[CALIBRATION_IDS].long()


class InputMoments:
    """Forward pre-hooks summing x x^T (K, K) of the inputs of the named Linears of a layer."""

    def __init__(self, layer, names: Iterable[str]):
        self.sums, self.tokens = {}, {}
        self.hooks = [layer.get_submodule(n).register_forward_pre_hook(self.hook(n)) for n in names]

    def hook(self, name: str):
        def observe(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (M, K)
            if name in self.sums:
                self.sums[name].addmm_(x.T, x)  # in place: at 7B down_proj's sum is 1.4 GB
            else:
                self.sums[name] = x.T @ x
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]
        return observe

    def remove(self) -> dict[str, torch.Tensor]:
        """Stop observing; {observed Linear: E[x x^T] of its input}."""
        for h in self.hooks:
            h.remove()
        return {src: self.sums[src] / self.tokens[src] for src in self.sums}


@torch.no_grad()
def gptq_layer(layer, index: int, plan: Mapping[str, str], group_size: int, run: CalibrationRun) -> dict:
    """Round decoder layer ``index``'s planned Linears by GPTQ against the blocks' inputs, give them the rounded
    weights, and move the blocks on through the layer so rounded. Returns {full name: (q, scale, zero)}."""
    prefix = f"model.layers.{index}."
    names = {n[len(prefix):]: input_source(n[len(prefix):]) for n in plan if n.startswith(prefix)}
    moments = InputMoments(layer, dict.fromkeys(names.values()))
    run.run(layer, index, advance=False)
    hessians, rounded = moments.remove(), {}
    for source in dict.fromkeys(names.values()):  # Linears reading one input: their rows rounded in one pass
        linears = {n: layer.get_submodule(n) for n, src in names.items() if src == source}
        q, scale, zero = gptq_int4(torch.cat([m.weight for m in linears.values()]), hessians[source], group_size)
        rows = [m.out_features for m in linears.values()]  # GPTQ treats rows apart: the split is exact
        for (name, linear), q_, s_, z_ in zip(linears.items(), q.split(rows), scale.split(rows), zero.split(rows)):
            rounded[prefix + name] = (q_, s_, z_)
            linear.weight.copy_(dequantize_int4(q_, s_, z_, group_size).to(linear.weight.dtype))
    del hessians
    run.run(layer, index, advance=True)
    return rounded


# ---- AWQ (scales and clipping searched against the calibration activations) ----------------------


def output_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T), dW = rounded - weight: the squared output error summed over rows, averaged over the tokens
    whose second moment is ``hessian``."""
    d = (rounded - weight).float()
    return float(((d @ hessian) * d).sum())


def awq_factors(weights: Iterable[torch.Tensor], hessian: torch.Tensor, group_size: int,
                rms: torch.Tensor | None = None) -> torch.Tensor:
    """Per input channel s (K,) = rms^a (normalised to a geometric mean of max and min of 1; ``rms`` defaults to
    sqrt(diag H)), a on a grid of ``AWQ_GRID`` + 1 values in [0, 1], the one whose rounded weight has the least
    output error (a = 0: s = 1, round to nearest). The error is summed over at most ``AWQ_SEARCH_ROWS`` evenly
    strided rows: one exponent serves every row."""
    w = torch.cat([t.detach() for t in weights])  # (N, K): Linears reading the same input
    w = w[:: -(-w.shape[0] // AWQ_SEARCH_ROWS)].float()  # (<= AWQ_SEARCH_ROWS, K)
    h = hessian.float()
    rms = (torch.diagonal(h).sqrt() if rms is None else rms).clamp(min=1e-8)
    best, best_s = None, torch.ones_like(rms)
    for i in range(AWQ_GRID + 1):
        s = rms.pow(i / AWQ_GRID)
        s = s / (s.max() * s.min()).sqrt()
        err = output_error(w, dequantize_int4(*quantize_int4(w * s, group_size), group_size) / s, h)
        if best is None or err < best:
            best, best_s = err, s
    return best_s


def kv_shared_rms(meansq: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """o_proj's input E[X^2] (heads * head_dim,) -> the rms per (key/value head, dim), averaged over the query
    heads that read that key/value head (repeat_kv's order: query head h reads h // (heads / kv_heads)), repeated
    for each of them: a scale that v_proj's rows can carry."""
    per_kv = meansq.reshape(kv_heads, -1, head_dim).mean(1, keepdim=True)  # (kv_heads, 1, head_dim)
    return per_kv.expand(kv_heads, meansq.numel() // (kv_heads * head_dim), head_dim).reshape(-1).sqrt()


def _scaled(hessian: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """H of the input x / s."""
    return hessian / (s[:, None] * s[None, :])


@torch.no_grad()
def awq_fold(layer, hessians: Mapping[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """Fold AWQ scales into a float decoder layer in place (it computes the same function up to fp32 rounding);
    ``hessians``: {source Linear (q_proj, o_proj, gate_proj, down_proj): H of its input}. Returns H of each
    (now scaled) input, by source."""
    attn, mlp, scaled = layer.self_attn, layer.mlp, {}
    h = hessians["mlp.down_proj"]
    s = awq_factors([mlp.down_proj.weight], h, group_size)
    mlp.up_proj.weight.div_(s.to(mlp.up_proj.weight.dtype)[:, None])
    mlp.down_proj.weight.mul_(s.to(mlp.down_proj.weight.dtype)[None, :])
    scaled["mlp.down_proj"] = _scaled(h, s)
    h, v = hessians["self_attn.o_proj"], attn.v_proj
    kv_heads = v.out_features // attn.head_dim
    s = awq_factors([attn.o_proj.weight], h, group_size, kv_shared_rms(torch.diagonal(h), kv_heads, attn.head_dim))
    s_kv = s.reshape(kv_heads, -1, attn.head_dim)[:, 0].reshape(-1).to(v.weight.dtype)  # (kv_heads * head_dim,)
    v.weight.div_(s_kv[:, None])
    if v.bias is not None:
        v.bias.div_(s_kv)
    attn.o_proj.weight.mul_(s.to(attn.o_proj.weight.dtype)[None, :])
    scaled["self_attn.o_proj"] = _scaled(h, s)
    for norm_name, linear_names in SMOOTH_GROUPS:
        norm, linears = getattr(layer, norm_name), [layer.get_submodule(n) for n in linear_names]
        h = hessians[linear_names[0]]
        s = awq_factors([lin.weight for lin in linears], h, group_size)
        norm.weight.div_(s.to(norm.weight.dtype))
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
        scaled[linear_names[0]] = _scaled(h, s)
    return scaled


@torch.no_grad()
def awq_layer(layer, index: int, plan: Mapping[str, str], group_size: int, run: CalibrationRun) -> dict:
    """AWQ on decoder layer ``index``: H of each input from the blocks, scales folded (``awq_fold``), the planned
    Linears rounded with clipping against their group's block of H and given the rounded weights, the blocks moved
    on through the layer so rounded. Returns {full name: (q, scale, zero)}."""
    prefix = f"model.layers.{index}."
    sources = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    moments = InputMoments(layer, sources)
    run.run(layer, index, advance=False)
    hessians = awq_fold(layer, moments.remove(), group_size)
    rounded = {}
    for full in (n for n in plan if n.startswith(prefix)):
        name = full[len(prefix):]
        linear = layer.get_submodule(name)
        rounded[full] = quantize_int4(linear.weight, group_size, hessians[input_source(name)])
        linear.weight.copy_(dequantize_int4(*rounded[full], group_size).to(linear.weight.dtype))
    del hessians
    run.run(layer, index, advance=True)
    return rounded


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
    if scheme not in CALIBRATED_SCHEMES:
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


def quantized_module(linear: nn.Linear, kind: str, group_size: int, rounded=None) -> nn.Module:
    if kind == "w4a16":
        return Int4Linear.from_linear(linear, group_size, quantized=rounded)
    return Int8Linear.from_linear(linear, "int8" if kind == "w8a8" else "bf16")


def replace_linears(root: nn.Module, prefix: str, plan: Mapping[str, str], group_size: int,
                    rounded: Mapping | None = None) -> None:
    """Swap the Linears of ``root`` (whose name in the model is ``prefix``) that ``plan`` names for their
    quantized modules, in place (``rounded``: int4 numbers already computed, by AWQ or GPTQ)."""
    for name, module in list(root.named_modules()):
        full = f"{prefix}.{name}" if prefix and name else prefix or name
        if full in plan and isinstance(module, nn.Linear):
            new = quantized_module(module, plan[full], group_size, (rounded or {}).get(full))
            parent_name, _, leaf = name.rpartition(".")
            root.get_submodule(parent_name).__setattr__(leaf, new)


@torch.no_grad()
def quantize_layer(layer, index: int, scheme: str, plan: Mapping[str, str], *, stats=None, alpha: float = 0.5,
                   group_size: int = DEFAULT_GROUP_SIZE, run: CalibrationRun | None = None) -> None:
    """Quantize decoder layer ``index`` in place: fold SmoothQuant / AWQ scales or round by GPTQ (``run``: the
    calibration blocks, at this layer's input), then swap in the ``plan``'s quantized modules. The unit both
    ``quantize_model`` and ``quantize_checkpoint`` run."""
    rounded = {}
    if scheme == "smoothquant":
        smooth_layer(layer, index, stats, alpha)
    elif scheme == "awq":
        rounded = awq_layer(layer, index, plan, group_size, run)
    elif scheme == "gptq":
        rounded = gptq_layer(layer, index, plan, group_size, run)
    replace_linears(layer, f"model.layers.{index}", plan, group_size, rounded=rounded)


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
    round to nearest, groups of ``group_size`` inputs), "awq" or "gptq" (int4, need ``stats``). ``skip``: Linear names
    or patterns kept in float (default: lm_head). The applied settings are recorded in
    ``model.config.quantization_config``, which ``save_quantized`` writes to config.json. The whole model is in
    memory; ``quantize_checkpoint`` does the same one decoder layer at a time.
    """
    skip = tuple(skip)
    stats = check_request(scheme, stats, group_size, alpha)
    plan = plan_modules(model, scheme, skip)
    run = None
    if scheme in LAYERWISE_SCHEMES:
        base = model.model
        run = CalibrationRun(base, model.config, base.rotary_emb, base.embed_tokens(calibration_ids(stats)))
    for i, layer in enumerate(model.model.layers):
        quantize_layer(layer, i, scheme, plan, stats=stats, alpha=alpha, group_size=group_size, run=run)
    replace_linears(model, "", {n: k for n, k in plan.items() if not n.startswith("model.layers.")}, group_size)
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = quantization_config(scheme, plan, alpha=alpha, group_size=group_size,
                                                               skip=skip)
    return model
