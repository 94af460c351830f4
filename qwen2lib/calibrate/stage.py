"""Stage 2: per-channel activation statistics of every Linear's input, on a calibration set.

A forward pre-hook on each ``nn.Linear`` sees its input X (B, T, K) and keeps, per input channel k:

  absmax       max over all calibration tokens of |X_k|: exact, what SmoothQuant's s_j uses.
  percentile   a high percentile (default 99.9) of |X_k| over tokens. Storing every token of every Linear
               is too much memory at real shapes, so it is estimated batch by batch: the exact nearest-rank
               percentile of the batch's tokens (``kthvalue``), then the token-weighted mean over batches.
               With a single batch it is exact; with several it is the mean of per-batch percentiles,
               which is stable in the number of batches where the max only grows. The gap between the two
               is what clipping (a percentile instead of the max) would buy.
  meansq       mean over tokens of X_k^2: the diagonal of the input's second moment, how much an error in
               column k of the weight costs at the output, its correlations left out (AWQ and GPTQ need them:
               they recompute the whole second moment from the token blocks, one decoder layer at a time).

Saved with the model id, data set label, sample count and seed as ``stats.safetensors`` (keys
``<linear>.absmax``, ``<linear>.percentile`` and ``<linear>.meansq``, (K,) fp32, and ``calibration.input_ids``, the
(N, L) token blocks themselves, which AWQ and GPTQ run through the model again) plus ``metrics.json`` (the summary).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..artifacts import default_workdir, read_metrics, stage_dir, write_metrics
from .data import DATASETS, CalibrationDataError, load_calibration_texts, sample_token_blocks
from ..errors import BadInputError, Qwen2LibError
from ..deploy import ensure_patched
# STATS_FILE, load_stats: notebooks read the statistics through this stage
from ..deploy.schemes import CALIBRATION_IDS, STATS_FILE, load_stats  # noqa: F401
from ..deploy.layerwise import LayerwiseModel
from ..model.corpus import model_text
from ..model.registry import resolve
from ..stages.reuse import ensure_stage, recorded_request
from ..model.tokenizer import load_tokenizer

DEFAULT_PERCENTILE = 99.9


def nearest_rank_percentile(abs_x: torch.Tensor, percentile: float) -> torch.Tensor:
    """(M, K) -> (K,): the ceil(p/100 * M)-th smallest value of each column (kthvalue has no size limit)."""
    m = abs_x.shape[0]
    k = min(m, max(1, math.ceil(percentile / 100 * m)))
    return abs_x.kthvalue(k, dim=0).values


class ActivationStats:
    """Forward pre-hooks on every nn.Linear of a model, accumulating per-channel input statistics."""

    def __init__(self, model: nn.Module, percentile: float = DEFAULT_PERCENTILE):
        if not 0 < percentile <= 100:
            raise BadInputError(f"percentile={percentile}: use a value in (0, 100], e.g. 99.9")
        self.percentile = percentile
        self.absmax: dict[str, torch.Tensor] = {}
        self.percentile_sum: dict[str, torch.Tensor] = {}
        self.square_sum: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.hooks = [module.register_forward_pre_hook(self.hook(name))
                      for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        if not self.hooks:
            raise ValueError("the model has no nn.Linear to observe (is it already quantized?)")

    def hook(self, name: str):
        def observe(module, args):
            x = args[0].detach()
            abs_x = x.reshape(-1, x.shape[-1]).float().abs()  # (M, K)
            m = abs_x.shape[0]
            batch_max = abs_x.amax(dim=0)
            batch_pct = nearest_rank_percentile(abs_x, self.percentile).double() * m  # token-weighted
            batch_sq = abs_x.square().sum(dim=0, dtype=torch.float64)
            if name in self.absmax:
                torch.maximum(self.absmax[name], batch_max, out=self.absmax[name])
                self.percentile_sum[name] += batch_pct
                self.square_sum[name] += batch_sq
                self.tokens[name] += m
            else:
                self.absmax[name], self.percentile_sum[name], self.tokens[name] = batch_max, batch_pct, m
                self.square_sum[name] = batch_sq
        return observe

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.absmax:
            out[f"{name}.absmax"] = self.absmax[name].contiguous()
            # a token-weighted mean of per-batch percentiles, each <= its batch's max: clamped to the max, which only
            # floating-point rounding of the sum could pass (where every batch's percentile is its max)
            mean = (self.percentile_sum[name] / self.tokens[name]).float()
            out[f"{name}.percentile"] = torch.minimum(mean, self.absmax[name]).contiguous()
            out[f"{name}.meansq"] = (self.square_sum[name] / self.tokens[name]).float().contiguous()
        return out


@torch.no_grad()
def collect_activation_stats(model: nn.Module, blocks: torch.Tensor, *, percentile: float = DEFAULT_PERCENTILE,
                             batch_size: int = 4, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run (N, L) token blocks through the model in batches; {"<linear>.absmax"|".percentile"|".meansq": (K,)}."""
    observer = ActivationStats(model, percentile)
    try:
        starts = range(0, blocks.shape[0], batch_size)
        for start in tqdm(starts, desc="calibration", unit="batch", disable=not progress):
            model(blocks[start : start + batch_size], use_cache=False)
    finally:
        observer.remove()
    return observer.tensors()


@torch.no_grad()
def collect_activation_stats_layerwise(package: str | os.PathLike, blocks: torch.Tensor, *,
                                       percentile: float = DEFAULT_PERCENTILE, batch_size: int = 4,
                                       progress: bool = True) -> dict[str, torch.Tensor]:
    """``collect_activation_stats`` of a deploy package, one decoder layer in memory at a time
    (``qwen2lib.deploy.layerwise``): every batch's hidden states go through layer i, then layer i is dropped.

    The statistics equal the whole model's: each Linear sees the same inputs, batch by batch in the same order.
    The head is never multiplied: its input (the final norm's output, the last position only when the package
    slices) is observed directly.
    """
    streamed = LayerwiseModel(package)
    observer = ActivationStats(streamed.skeleton, percentile)
    try:
        batches = [blocks[start : start + batch_size] for start in range(0, blocks.shape[0], batch_size)]
        layers = tqdm(total=streamed.num_layers, desc="calibration", unit="layer", disable=not progress)
        with layers:
            normed = streamed.final_hidden(batches, on_layer=lambda i, hidden: layers.update())
        observe_head = observer.hook("lm_head")
        for h in normed:  # (B, T, D)
            observe_head(None, (h[:, -1:, :] if getattr(streamed.config, "insert_slice", False) else h,))
    finally:
        observer.remove()
    return observer.tensors()


def linear_names(stats: Mapping[str, torch.Tensor]) -> list[str]:
    return [k[: -len(".absmax")] for k in stats if k.endswith(".absmax")]


def outlier_summary(stats: Mapping[str, torch.Tensor], top: int = 5) -> dict[str, dict]:
    """Per Linear: largest absmax, its channel, the median channel, their ratio, the top channels."""
    summary = {}
    for name in linear_names(stats):
        a = stats[f"{name}.absmax"]
        values, channels = a.topk(min(top, a.numel()))
        median = float(a.median())
        summary[name] = {"max": float(values[0]), "argmax_channel": int(channels[0]), "median": median,
                         "max_over_median": float(values[0]) / median if median > 0 else math.inf,
                         "top_channels": channels.tolist(),
                         "percentile_max": float(stats[f"{name}.percentile"].max())}
    return summary


def save_stats(folder: str | os.PathLike, stats: Mapping[str, torch.Tensor], metrics: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.float() if v.is_floating_point() else v).contiguous().cpu() for k, v in stats.items()},
              str(folder / STATS_FILE),
              metadata={k: json.dumps(metrics.get(k)) for k in ("model", "dataset", "samples", "seq_len", "seed")})
    write_metrics(folder, metrics)
    return folder


def is_instruct(model: str) -> bool:
    try:
        return bool(resolve(model).instruct)
    except Qwen2LibError:  # a folder the registry cannot name: decide by its name
        return "instruct" in str(model).lower() or "chat" in str(model).lower()


DEFAULT_REQUEST = {"dataset": "builtin", "data_path": None, "samples": 16, "seq_len": 128,
                   "percentile": DEFAULT_PERCENTILE, "batch_size": 4}
# A trained checkpoint is a general model: calibrated on general text, on enough tokens for AWQ and GPTQ to see its
# outlier channels (peers use 128 x 512; this is what a 2-core machine does in minutes at 1.5B).
TRAINED_REQUEST = {"dataset": "prose", "samples": 32, "seq_len": 256}


def default_request(model: str, weights: str) -> dict:
    """The defaults for ``model``: the embedded models (trained on the stdlib's code) and random weights calibrate
    on code, CI-sized; any other trained checkpoint on prose (``qwen2lib.model.corpus.model_text``)."""
    try:
        embedded = resolve(model).embedded
    except Qwen2LibError:
        embedded = False
    trained_general = weights == "auto" and model_text(embedded) == "prose"
    return {**DEFAULT_REQUEST, **(TRAINED_REQUEST if trained_general else {})}


def calibration_request(folder: Path, seed: int, defaults: dict | None = None, **asked) -> dict:
    """The calibration request: what was asked; for what was not (None), the existing calibration's value
    when there is one (so 03 uses 02's statistics), else the default. Another data set is only ever used
    when asked for."""
    existing = recorded_request(folder) or {}
    request = {k: (asked.get(k) if asked.get(k) is not None else existing.get(k, default))
               for k, default in (defaults or DEFAULT_REQUEST).items()}
    if asked.get("dataset") is not None and asked.get("data_path") is None:
        request["data_path"] = None  # a data set named anew does not inherit the old one's path
    request["data_path"] = str(request["data_path"]) if request["data_path"] else None
    request["seed"] = seed
    return request


def ensure_calibration(model: str = "tiny", weights: str = "auto", workdir: str | os.PathLike | None = None, *,
                       dataset: str | None = None, data_path: str | os.PathLike | None = None,
                       samples: int | None = None, seq_len: int | None = None, seed: int = 0,
                       percentile: float | None = None, batch_size: int | None = None, fallback: bool = True,
                       force: bool = False, progress: bool = True, verbose: bool = True,
                       package: str | os.PathLike | None = None) -> Path:
    """``<workdir>/calibration/`` (stats.safetensors + metrics.json): the statistics of notebook 01's deploy
    package (loaded with its checked remote code) on a calibration set.

    Settings left None keep the existing calibration's (``calibration_request``); defaults are CI-sized
    (peers use 128 x 512). An instruct model sees its samples through its chat template. ``package``: the deploy
    package a caller has just ensured (``ensure_patched``), so a call resolves each upstream stage once.
    """
    workdir = Path(workdir) if workdir else default_workdir(model)
    out = stage_dir(workdir, "calibration")
    request = calibration_request(out, seed, default_request(model, weights), dataset=dataset, data_path=data_path,
                                  samples=samples, seq_len=seq_len, percentile=percentile, batch_size=batch_size)
    if request["dataset"] not in DATASETS:
        raise CalibrationDataError(f"dataset {request['dataset']!r}: use one of {', '.join(DATASETS)}")
    package = Path(package) if package else ensure_patched(model, weights, workdir, seed=seed, verbose=verbose)

    def build(tmp: Path) -> dict:
        tokenizer = load_tokenizer(str(package))
        chat = is_instruct(model)
        texts = load_calibration_texts(request["dataset"], request["data_path"], tokenizer=tokenizer, chat=chat,
                                       fallback=fallback)
        blocks = sample_token_blocks(texts.texts, tokenizer, request["samples"], request["seq_len"], seed)
        stats = collect_activation_stats_layerwise(package, blocks, percentile=request["percentile"],
                                                   batch_size=request["batch_size"], progress=progress)
        metrics = {
            "request": request, "model": str(model), "weights": weights, "seed": seed, "deploy_package": str(package),
            "dataset": texts.label, "dataset_name": texts.dataset, "fallback": texts.fallback, "source": texts.source,
            "chat_template": chat, "samples": request["samples"], "seq_len": request["seq_len"],
            "tokens": int(blocks.numel()), "documents": len(texts.texts), "percentile": request["percentile"],
            "percentile_estimator": "mean over batches of the per-batch nearest-rank percentile, token-weighted",
            "linears": len(linear_names(stats)), "outliers": outlier_summary(stats),
        }
        save_stats(tmp, {**stats, CALIBRATION_IDS: blocks}, metrics)  # the blocks: GPTQ runs them again
        return metrics

    return ensure_stage("calibration", out, request, {"patched": package}, build, force=force, verbose=verbose)


def describe(folder: str | os.PathLike) -> str:
    """One line: which data the statistics in ``folder`` came from."""
    m = read_metrics(folder)
    return (f"calibration statistics of {m['dataset_name']} ({m['samples']} x {m['seq_len']} tokens"
            f"{', fallback for an unavailable set' if m.get('fallback') else ''}) from {folder}")


# ---- plots --------------------------------------------------------------------------------------


def layer_matrix(stats: Mapping[str, torch.Tensor], linear: str = "self_attn.q_proj", key: str = "absmax"):
    """(layers, K) matrix of one Linear kind's per-channel statistic, rows in layer order."""
    rows = []
    i = 0
    while f"model.layers.{i}.{linear}.{key}" in stats:
        rows.append(stats[f"model.layers.{i}.{linear}.{key}"])
        i += 1
    if not rows:
        raise KeyError(f"no statistics for model.layers.*.{linear}: pick one of "
                       f"{sorted({n.split('.', 3)[-1] for n in linear_names(stats) if n.startswith('model.layers.')})}")
    return torch.stack(rows)


def plot_outlier_heatmap(stats: Mapping[str, torch.Tensor], linear: str = "self_attn.q_proj", label: str = "", ax=None):
    """Heatmap of log10 absmax per (layer, input channel): outlier channels show as bright columns."""
    m = layer_matrix(stats, linear)
    ax = ax or plt.subplots(figsize=(9, 0.4 * m.shape[0] + 1.5))[1]
    image = ax.imshow(m.clamp(min=1e-6).log10().numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="log10 max|x|")
    ax.set_xlabel("input channel")
    ax.set_ylabel("decoder layer")
    ax.set_yticks(range(0, m.shape[0], max(1, m.shape[0] // 12)))
    ax.set_title(f"per-channel input absmax of {linear}" + (f"\n{label}" if label else ""), fontsize=9)
    return ax


def plot_channel_distribution(stats: Mapping[str, torch.Tensor], name: str, label: str = "", ax=None):
    """One Linear's channels sorted by absmax, with the high percentile beside it (log scale)."""
    absmax, pct = stats[f"{name}.absmax"], stats[f"{name}.percentile"]
    order = absmax.argsort(descending=True)
    ax = ax or plt.subplots(figsize=(8, 3.2))[1]
    ax.plot(absmax[order].numpy(), label="absmax")
    ax.plot(pct[order].numpy(), label="high percentile (per-batch mean)", alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("input channels, sorted by absmax")
    ax.set_ylabel("|x|")
    ax.set_title(f"{name}" + (f"\n{label}" if label else ""), fontsize=9)
    ax.legend()
    return ax
