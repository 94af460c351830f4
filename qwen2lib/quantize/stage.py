"""Stage 3 (notebook 03): the deploy package's own ``quantize()`` run with notebook 02's statistics, saved as a
quantized package, and measured against the fp32 package (fidelity report, per-layer SQNR, sizes).

The schemes (W8A16, SmoothQuant W8A8, int4 W4A16 round-to-nearest and AWQ) and the quantized package's format live in
the package itself: ``schemes_<target>.py`` and ``quantization_<target>.py``, copies of ``qwen2lib/deploy/schemes.py``
and ``qwen2lib/deploy/quantizer.py`` (read their docstrings). This module is the
stage around them: which statistics to use, when to rebuild, the report, sizes and matmul timings, the CLI.
``load_quantized(pkg)`` is ``AutoModelForCausalLM.from_pretrained(pkg, trust_remote_code=True)`` after checking
the package's code, with transformers' warning about the (to it) unknown ``quant_method`` silenced.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..artifacts import default_workdir, read_metrics, stage_dir
from ..errors import BadInputError
from ..calibrate.stage import default_request, describe as describe_calibration, ensure_calibration
from ..deploy import ensure_patched, package_auto_map, package_target, verify_package_code
from ..deploy.quantized_package import (INT8_CLASS, INT8_MODELING_FILE, WEIGHTS_FILE, int8_auto_map, int8_code,
                                        save_quantized)
from ..deploy.quantizer import (DEFAULT_GROUP_SIZE, Int8Linear, QuantizationError, dequantize_weight, is_int4_linear,
                                is_int8_linear)
from ..deploy.schemes import (DEFAULT_SKIP, INT4_SCHEMES, INT8_SCHEMES, QUANT_METHOD, SCHEMES, check_settings,
                              is_skipped, load_stats, quantize_model)
from ..evaluation.fidelity import fidelity_report, heldout_blocks as make_heldout_blocks, sqnr_db
from ..deploy.layerwise import LayerwiseModel
from ..stages.reuse import ensure_stage, recorded_request

__all__ = ["DEFAULT_SKIP", "INT4_SCHEMES", "INT8_CLASS", "INT8_MODELING_FILE", "INT8_SCHEMES", "Int8Linear",
           "QUANT_METHOD", "QuantizationError", "SCHEMES", "WEIGHTS_FILE", "dequantize_weight", "disk_bytes", "ensure_quantized",
           "is_int4_linear", "is_int8_linear", "is_skipped", "layerwise_quantized", "streamed_fidelity",
           "linear_bytes", "load_quantized", "memory_bytes", "quantize_model",
           "save_quantized", "size_table", "verify_quantized_code"]


def verify_quantized_code(package: str | os.PathLike) -> dict[str, str]:
    """``verify_package_code`` for a quantized package: its files are the deploy package's plus the int8 one."""
    package = Path(package)
    auto_map = int8_auto_map(package_auto_map(package_target(package)))
    return verify_package_code(package, int8_code(package), auto_map)


def layerwise_quantized(package_dir: str | os.PathLike) -> LayerwiseModel:
    """A quantized package's model built without weights (its code checked), run one decoder layer at a time."""
    return LayerwiseModel(package_dir, verify=verify_quantized_code)


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


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_bytes(model) -> int:
    """Bytes of every parameter and buffer, shared ones (tied embeddings) counted once; a model on the ``meta``
    device counts what it would hold."""
    return tensor_bytes([t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()])


def linear_bytes(model) -> int:
    """Bytes held by the Linear layers (float, int8 or int4) but lm_head: the part quantization shrinks."""
    total = 0
    for name, module in model.named_modules():
        quantized = is_int8_linear(module) or is_int4_linear(module)
        if (isinstance(module, nn.Linear) or quantized) and not name.endswith("lm_head"):
            total += tensor_bytes(list(module.parameters()) + list(module.buffers()))
    return total


def disk_bytes(folder: str | os.PathLike) -> int:
    """Bytes of a folder's *.safetensors (symlinks followed: a deploy package links the checkpoint's)."""
    return sum(p.resolve().stat().st_size for p in Path(folder).glob("*.safetensors"))


def size_table(sizes: Mapping[str, Mapping[str, int]]):
    """{label: {"disk_bytes", "memory_bytes"[, "linear_bytes"]}} -> DataFrame in MiB, with ratios to the first row."""
    columns = {"disk_bytes": "on disk (MiB)", "memory_bytes": "in memory (MiB)", "linear_bytes": "Linear layers (MiB)"}
    rows = {label: {title: s[key] / 2**20 for key, title in columns.items() if key in s} for label, s in sizes.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    first = table.iloc[0]
    for title in list(table.columns):
        table[title.replace(" (MiB)", " vs first")] = table[title] / first[title]
    return table


# ---- the stage ----------------------------------------------------------------------------------


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


DEFAULT_SETTINGS = {"alpha": 0.5, "skip": list(DEFAULT_SKIP), "heldout_blocks": 4, "heldout_len": 64,
                    "heldout_text": "code", "group_size": DEFAULT_GROUP_SIZE}
# A trained checkpoint is verified on general text, on enough tokens to rank the schemes (256 tokens could not tell
# AWQ from round-to-nearest on a real 0.5B).
TRAINED_SETTINGS = {"heldout_blocks": 16, "heldout_len": 128, "heldout_text": "prose"}
HELDOUT_TEXTS = {"code": "stdlib held-out files (qwen2lib.model.corpus), never trained on",
                 "prose": "READMEs of held-out installed packages (qwen2lib.model.corpus.prose_corpus)"}


def quantize_settings(out: Path, defaults: dict | None = None, **asked) -> dict:
    """The settings asked for; those left None keep what the package in ``out`` was built with (so notebook 05
    reuses notebook 03's package), else the defaults."""
    existing = recorded_request(out) or {}
    return {k: asked[k] if asked.get(k) is not None else existing.get(k) if existing.get(k) is not None else default
            for k, default in (defaults or DEFAULT_SETTINGS).items()}


def default_settings(model: str, weights: str) -> dict:
    """The defaults for ``model``: a trained checkpoint other than the embedded ones is verified on more prose."""
    trained_general = default_request(model, weights)["dataset"] == "prose"
    return {**DEFAULT_SETTINGS, **(TRAINED_SETTINGS if trained_general else {})}


def ensure_quantized(model: str = "tiny", weights: str = "auto", workdir: str | os.PathLike | None = None, *,
                     scheme: str = "w8a16", alpha: float | None = None, seed: int = 0,
                     skip: Iterable[str] | None = None, heldout_blocks: int | None = None,
                     heldout_len: int | None = None, heldout_text: str | None = None, group_size: int | None = None,
                     calibration: Mapping | None = None, force: bool = False, verbose: bool = True,
                     package: str | os.PathLike | None = None) -> Path:
    """``<workdir>/quantized/<scheme>/``: the deploy package's own ``quantize()`` run with notebook 02's
    statistics, saved as a quantized package, with a metrics.json holding the fidelity report vs the fp32
    deploy package on held-out blocks, per-layer SQNR, the sizes and the activation outliers the statistics
    show. Reused when nothing it depends on changed (``qwen2lib.stages.reuse``).

    ``group_size``: inputs per int4 scale and zero point (w4a16, awq, gptq; default 128).
    ``heldout_text``: "code" (stdlib files) or "prose" (package READMEs) for the fidelity report; the default is the
    text the model is for (``default_settings``).
    ``calibration``: settings for ``ensure_calibration`` (dataset, data_path, samples, ...); None uses the
    existing calibration as it is. Other settings left None keep the existing package's (``quantize_settings``).
    ``package``: the deploy package a caller has just ensured (each upstream stage resolved once per call).
    """
    workdir = Path(workdir) if workdir else default_workdir(model)
    out = stage_dir(workdir, "quantized", scheme)
    settings = quantize_settings(out, default_settings(model, weights), alpha=alpha,
                                 skip=None if skip is None else list(skip), heldout_blocks=heldout_blocks,
                                 heldout_len=heldout_len, heldout_text=heldout_text, group_size=group_size)
    alpha, skip, group_size = settings["alpha"], tuple(settings["skip"]), settings["group_size"]
    heldout_blocks, heldout_len, heldout_text = settings["heldout_blocks"], settings["heldout_len"], settings["heldout_text"]
    if heldout_text not in HELDOUT_TEXTS:
        raise BadInputError(f"heldout_text={heldout_text!r}: use one of {', '.join(HELDOUT_TEXTS)}")
    check_settings(scheme, alpha, group_size)
    package = Path(package) if package else ensure_patched(model, weights, workdir, seed=seed, verbose=verbose)
    calibration_dir = ensure_calibration(model, weights, workdir, seed=seed, verbose=verbose, package=package,
                                         **calibration_to_use(workdir, out, calibration))
    if verbose:
        print(f"[quantized] {describe_calibration(calibration_dir)}", file=sys.stderr, flush=True)
    request = {"scheme": scheme, "alpha": alpha if scheme == "smoothquant" else None, "skip": list(skip),
               "heldout_blocks": heldout_blocks, "heldout_len": heldout_len, "heldout_text": heldout_text, "seed": seed,
               "calibration": recorded_request(calibration_dir)}
    if scheme in INT4_SCHEMES:  # only int4 packages record it: the int8 ones' requests stay as they were
        request["group_size"] = group_size

    def build(tmp: Path) -> dict:
        stats = load_stats(calibration_dir)
        reference = LayerwiseModel(package)  # the package's classes, no weights: the streamed fp32 reference
        started = time.perf_counter()
        extra = {"group_size": group_size} if scheme in INT4_SCHEMES else {}
        # the package's own entry point, one decoder layer at a time
        type(reference.skeleton).quantize_checkpoint(package, tmp, scheme, stats=stats, alpha=alpha, skip=skip, **extra)
        quantize_s = time.perf_counter() - started
        blocks = make_heldout_blocks(AutoTokenizer.from_pretrained(str(package)), heldout_blocks, heldout_len, seed=seed,
                                     text=heldout_text)
        candidate = layerwise_quantized(tmp)
        report, sqnr = streamed_fidelity(reference, candidate, blocks)
        sizes = {label: {"disk_bytes": disk_bytes(folder), "memory_bytes": memory_bytes(m.skeleton),
                         "linear_bytes": linear_bytes(m.skeleton)}
                 for label, folder, m in (("fp32", package, reference), (scheme, tmp, candidate))}
        # the reference runs in fp32, but its bytes on disk are the checkpoint as shipped (often bf16)
        package_config = json.loads((package / "config.json").read_text(encoding="utf-8"))
        sizes["fp32"]["disk_dtype"] = package_config.get("dtype") or package_config.get("torch_dtype")
        return {
            "request": request, "generated_code": verify_quantized_code(tmp), "scheme": scheme,
            "deploy_package": str(package), "calibration": str(calibration_dir),
            "calibration_data": read_metrics(calibration_dir)["dataset"],
            "quantization_config": candidate.config.quantization_config,
            "fidelity": report, "sqnr_db": sqnr, "sizes": sizes, "quantize_s": quantize_s,
            "heldout": {"blocks": heldout_blocks, "tokens_per_block": heldout_len,
                        "text": HELDOUT_TEXTS[heldout_text], "kind": heldout_text},
        }

    return ensure_stage("quantized", out, request, {"patched": package, "calibration": calibration_dir}, build,
                        force=force, verbose=verbose)


def streamed_fidelity(reference: LayerwiseModel, candidate: LayerwiseModel, blocks: torch.Tensor) -> tuple[dict, dict]:
    """The fidelity report of ``candidate`` against ``reference`` on the (N, T) held-out blocks, and the SQNR of
    every decoder layer's output on the first block: each model streamed once over its layers (one block per
    batch, as the whole model ran them), the heads applied block by block."""
    batches = [blocks[i : i + 1] for i in range(blocks.shape[0])]
    layer_outputs: dict[str, dict[str, torch.Tensor]] = {"reference": {}, "candidate": {}}
    hidden = {}
    for side, model in (("reference", reference), ("candidate", candidate)):
        def keep_first(i, states, kept=layer_outputs[side]):
            kept[f"layers.{i}"] = states[0].clone()

        hidden[side] = model.final_hidden(batches, on_layer=keep_first)

    def replay(side: str, model: LayerwiseModel):
        pending = list(zip(batches, hidden[side]))

        def logits(ids: torch.Tensor) -> torch.Tensor:
            expected, states = pending.pop(0)
            if not torch.equal(expected, ids):
                raise RuntimeError("the fidelity report asked for blocks in another order than they were run")
            return model.head(states)

        return logits

    report = fidelity_report(replay("reference", reference), replay("candidate", candidate), blocks, batch_size=1)
    ref, cand = layer_outputs["reference"], layer_outputs["candidate"]
    return report, {name: sqnr_db(ref[name], cand[name]) for name in ref}


