"""What a stage needs, from the model's config alone: parameters, bytes, and the resident memory of each stage.

Every figure here is a pure function of ``config.json``'s numbers (nothing is loaded), so a stage can refuse before
it starts (``check_fits``: one line with the numbers) instead of dying to the out-of-memory killer, and a notebook
can show the estimate in its first cell (``describe``).

Parameters of a Qwen2 (H hidden, I intermediate, V vocabulary, L layers, n_h query / n_kv key-value heads of hd):

    per layer   q (n_h hd) H + k, v 2 (n_kv hd) H + their biases + o H (n_h hd) + gate, up, down 3 H I + 2 norms H
    embedding   V H           head: V H more when the embeddings are not tied         final norm: H

Resident memory per stage (bytes), as the stages are written: the streamed ones hold one decoder layer, not the
model; ``RUNTIME_BYTES`` is what the Python process holds before any weight (torch, transformers, onnxruntime).

    checkpoint      a few chunks of random draws and the tokenizer (random weights are written chunk by chunk)
    calibration     the text, one layer in fp32 (plus its bf16 read), the calibration batch's hidden states, one
                    batch's activations (the MLP's (B, T, I) and the attention scores)
    quantized       one decoder layer in fp32 while it is scaled and rounded, one output shard, then the fidelity
                    report's reference and candidate streamed layer by layer (logits of one held-out block at a time)
    compiled        the graph's weights once (onnxruntime holds the session's copy for the verification), the
                    verification's logits (reference, graph, float64 rows: a few x blocks x tokens x V), one fp32
                    reference layer (streamed verification); building the graph holds one tensor, less than these
    inference       a backend's weights at its precision (torch fp32/bf16/fp16, an int8 package, a graph), a KV cache
                    of ``context`` positions for ``batch`` rows, and one prefill's activations (a graph prefills
                    ``GRAPH_PREFILL_CHUNK`` tokens a call); ``check_fits(config, "inference", label, ...)`` refuses
                    what does not fit and names what would (a quantized graph, a smaller context)
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import InsufficientDiskError, InsufficientMemoryError
from .model_config import Qwen2Args, as_args, shape_numbers
from .registry import resolve

GiB = 1 << 30
RUNTIME_BYTES = int(0.45 * GiB)  # torch + transformers imported, no weights (the patched stage's whole peak)
DATA_BYTES = int(0.3 * GiB)  # calibration's text: the built-in set is the Python standard library's sources
CALIBRATION_BATCH = (16, 128, 4)  # samples, tokens per sample, batch size: calibration's defaults
VERIFY_TOKENS = (4, 64)  # a compile's fidelity blocks x tokens (configs' verify.blocks, verify.block_tokens)
SHARD_BYTES = 2 * GiB  # quantized_package.MAX_SHARD_BYTES (the package cannot import qwen2lib; a test ties them)
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
GRAPH_PREFILL_CHUNK = 256  # compile.runtime.PREFILL_CHUNK: prompt tokens per graph call (a test ties them)
INFERENCE_CONTEXT = 4096  # positions an inference estimate assumes when the run does not say (a graph's default)


def parameter_counts(config: Qwen2Args | Mapping) -> dict[str, int]:
    """{"layer", "linear_per_layer", "embedding", "head", "total", "largest_tensor"}: parameter counts."""
    args = as_args(config)
    s = shape_numbers(args)
    H, I, V, L, q, kv = s["H"], s["I"], s["V"], s["L"], s["n_h"] * s["hd"], s["n_kv"] * s["hd"]
    linear = q * H + 2 * kv * H + H * q + 3 * H * I
    layer = linear + q + 2 * kv + 2 * H
    head = 0 if args.tie_word_embeddings else V * H
    return {"layer": layer, "linear_per_layer": linear, "embedding": V * H, "head": head,
            "total": L * layer + V * H + head + H, "largest_tensor": max(V * H, I * H)}


@dataclass(frozen=True)
class Estimate:
    """What one stage needs: resident bytes, the formula they come from, and bytes it writes to disk."""

    stage: str
    resident_bytes: int
    formula: str
    disk_bytes: int = 0


def int8_graph_bytes(config: Mapping) -> int:
    """The int8 graph's weights: every Linear, the embedding (and an untied head) as int8 plus one fp32 scale a row
    per 128-input block (MatMulNBits layout), norms in fp32."""
    p, s = parameter_counts(config), shape_numbers(config)
    int8 = s["L"] * p["linear_per_layer"] + p["embedding"] + p["head"]
    scales = int8 // 128 * 4
    return int8 + scales + (p["total"] - int8) * 4


def int4_graph_bytes(config: Mapping) -> int:
    """The int4 graph's weights: every layer Linear at half a byte plus an fp32 scale and a 4-bit zero point a
    128-input group (MatMulNBits bits=4); the embedding and an untied head counted as in the int8 graph."""
    p = parameter_counts(config)
    linear = shape_numbers(config)["L"] * p["linear_per_layer"]
    return int8_graph_bytes(config) - linear - linear // 128 * 4 + linear // 2 + linear // 128 * 9 // 2


def backend_bytes(config: Mapping, label: str) -> int:
    """The weights one of notebook 05's backends holds ("fp32 torch", "fp16 graph", "int8 torch smoothquant", ...):
    4 B a parameter in fp32, 2 in fp16 or bf16, the int8 graph's bytes for an int8 package or graph, the int4
    graph's for int4."""
    precision = label.split()[0]
    if precision == "int8":
        return int8_graph_bytes(config)
    if precision == "int4":
        return int4_graph_bytes(config)
    return (2 if precision in ("fp16", "bf16") else 4) * parameter_counts(config)["total"]


def kv_cache_bytes(config: Mapping, context: int, batch: int = 1, dtype_bytes: int = 4) -> int:
    s = shape_numbers(config)
    return 2 * s["L"] * s["n_kv"] * s["hd"] * context * batch * dtype_bytes


def activation_bytes(config: Mapping, tokens: int, keys: int, batch: int = 1, logits_rows: int = 0) -> int:
    """One layer's fp32 activations for ``tokens`` queries over ``keys`` positions (the MLP's (B, T, I) three
    times, four hidden-state copies, the attention scores) plus the logits of ``logits_rows`` positions."""
    s = shape_numbers(config)
    return 4 * batch * (tokens * (3 * s["I"] + 4 * s["H"] + s["n_h"] * keys) + logits_rows * s["V"])


def inference_estimate(config: Mapping, label: str = "int8 graph", context: int = INFERENCE_CONTEXT, batch: int = 1,
                       prompt_tokens: int | None = None, prefill_rows: int | None = None,
                       all_logits: bool = False) -> Estimate:
    """What running backend ``label`` needs ("fp32 torch", "bf16 torch", "int8 torch smoothquant", "int4 graph", ...,
    ``backend_bytes``'s labels) with a KV cache of ``context`` positions for each of ``batch`` rows: runtime +
    weights + the cache (in the backend's float: 2 B for fp16/bf16, else 4) + one prefill's activations
    (``prefill_rows`` rows, ``batch`` when not given, of ``prompt_tokens`` queries, ``context`` when not given; a
    graph runs ``GRAPH_PREFILL_CHUNK`` a call; logits for the last position, or every prefilled one with
    ``all_logits``: scoring)."""
    precision, kind = label.split()[:2]
    weights = backend_bytes(config, label)
    cache = kv_cache_bytes(config, context, batch, 2 if precision in ("fp16", "bf16") else 4)
    tokens = context if prompt_tokens is None else min(prompt_tokens, context)
    if kind == "graph":
        tokens = min(tokens, GRAPH_PREFILL_CHUNK)
    rows = batch if prefill_rows is None else prefill_rows
    acts = activation_bytes(config, tokens, context, rows, tokens if all_logits else 1)
    formula = (f"runtime {gb(RUNTIME_BYTES)} + {precision} weights {gb(weights)} + KV cache {gb(cache)} for {batch} x "
               f"{context} positions + activations {gb(acts)}")
    return Estimate(f"inference {label}", RUNTIME_BYTES + weights + cache + acts, formula)


def fidelity_logits_bytes(vocab: int) -> int:
    """A verification's logits: reference and candidate over its blocks (fp32), and the report's working copies."""
    blocks, tokens = VERIFY_TOKENS
    return 4 * blocks * tokens * vocab * 4 + 5 * tokens * vocab * 8


def stage_estimates(config: Mapping, *, calibration: tuple[int, int, int] = CALIBRATION_BATCH,
                    context: int = 4096, batch: int = 1) -> dict[str, Estimate]:
    """{stage label: Estimate} for checkpoint, patched, calibration, quantized, compiled fp32/int8, inference int8."""
    p, s = parameter_counts(config), shape_numbers(config)
    P, layer, big = p["total"], p["layer"], p["largest_tensor"]
    samples, seq_len, bsz = calibration
    hidden = 2 * samples * seq_len * s["H"] * 4  # the batch's hidden states in and out of the layer
    acts = activation_bytes(config, seq_len, seq_len, bsz)
    int8 = int8_graph_bytes(config)
    fp32 = 4 * P
    R = RUNTIME_BYTES
    verify = fidelity_logits_bytes(s["V"]) + 6 * layer
    quantized = R + DATA_BYTES + 12 * layer + min(SHARD_BYTES, P) + 2 * big + verify
    # GPTQ and AWQ: the blocks' hidden states and a batch's activations, H = E[x x^T] of the widest input (down_proj's),
    # its Cholesky factors (4 K x K fp32 at the peak) and gate|up's stacked rows being rounded
    gptq = hidden + acts + 16 * s["I"] ** 2 + 12 * 2 * s["I"] * s["H"]
    return {
        "checkpoint": Estimate("checkpoint", R + int(0.3 * GiB), "runtime + 0.3 GiB (tokenizer, draw chunks)", 2 * P),
        "patched": Estimate("patched", R, "runtime (links, no weights loaded)"),
        "calibration": Estimate("calibration", R + DATA_BYTES + 6 * layer + hidden + acts,
                                "runtime + text + 6 B x layer params (fp32 + bf16 read) + hidden states + batch "
                                "activations"),
        "quantized": Estimate("quantized", quantized,
                              "runtime + text + 12 B x layer params (one fp32 layer, its scaling and rounding) + one "
                              "shard being written (2 GiB at most) + the largest table in 16 bits + fidelity logits",
                              P),
        "quantized gptq": Estimate("quantized gptq", quantized + gptq,
                                   "the quantize stage's + calibration hidden states and activations + 16 B x "
                                   "intermediate^2 (down_proj's H and its factors) + gate|up's rows being rounded", P),
        "compiled fp32": Estimate("compiled fp32", R + fp32 + verify,
                                  "runtime + fp32 graph (onnxruntime) + verification logits (36 B x blocks x tokens "
                                  "x V) + 6 B x layer params", fp32),
        "compiled int8": Estimate("compiled int8", R + int8 + verify,
                                  "runtime + int8 graph (onnxruntime) + verification logits (36 B x blocks x tokens "
                                  "x V) + 6 B x layer params", int8),
        "compiled unverified": Estimate("compiled unverified", R + 5 * big + 6 * layer,
                                        "runtime + the largest tensor in fp32 and quantized + one layer's tensors "
                                        "(weights written as built; verification skipped: it needs the graph "
                                        "loaded, as inference does)"),
        "inference int8": inference_estimate(config, "int8 graph", context, batch),
    }


def estimate(config: Mapping, stage: str, precision: str | None = None, **run) -> Estimate:
    """The estimate of one stage (``compiled`` by precision; fp16 graphs count as fp32 here: their range probe runs
    the whole fp32 reference). ``inference``: ``precision`` is a backend label ("bf16 torch", "int8 graph", ...)
    or a graph's precision ("int8": the int8 graph), ``run`` the run's ``inference_estimate`` arguments (context,
    batch, prompt_tokens, prefill_rows, all_logits)."""
    if stage == "inference":
        label = precision if precision and " " in precision else f"{precision or 'fp32'} graph"
        return inference_estimate(config, label, **run)
    estimates = stage_estimates(config)
    if stage == "compiled":
        return estimates[f"{stage} {'int8' if precision in ('int8', 'int4') else 'fp32'}"]
    if stage in ("exported", "exported unverified"):  # the writers stream, and so does the verification
        p = parameter_counts(config)
        write = RUNTIME_BYTES + 5 * p["largest_tensor"]
        if stage == "exported unverified":
            return Estimate(stage, write, "runtime + the largest tensor, read and converted")
        verify = RUNTIME_BYTES + DATA_BYTES + 12 * p["layer"] + fidelity_logits_bytes(shape_numbers(config)["V"])
        return Estimate(stage, max(write, verify), "the writer's (runtime + the largest tensor, read and converted) or "
                        "the verification's (runtime + text + 12 B x layer params: a package layer and an export layer "
                        "in fp32, one being dequantized + fidelity logits), the larger")
    return estimates[stage]


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc): a loop that frees one layer's tensors and reads the next would
    otherwise keep the freed pages resident, layer after layer (fragmentation), and the peak would follow the model."""

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo: what can be allocated without swapping (Linux); a large figure elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def gb(n: int) -> str:
    if n < 0.1e9:  # a small cache or activation reads as MB, not "0.0 GB"
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e9:.0f} GB" if n >= 10e9 else f"{n / 1e9:.1f} GB"


WHAT = {"checkpoint": "random checkpoint build", "quantized": "quantize", "quantized gptq": "GPTQ/AWQ quantize",
        "exported": "export",
        "compiled fp32": "fp32 graph compile", "compiled int8": "int8 graph compile",
        "compiled unverified": "graph compile (unverified)", "exported unverified": "export (unverified)"}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def backend_words(label: str) -> str:
    """"bf16 torch" -> "in torch bfloat16"; "int8 torch smoothquant" -> "int8 package (smoothquant) in torch";
    graphs keep their label ("int8 graph")."""
    precision, kind, *scheme = label.split()
    if kind != "torch":
        return label
    if precision in TORCH_DTYPES:
        return f"in torch {TORCH_DTYPES[precision]}"
    return f"{precision} package{f' ({scheme[0]})' if scheme else ''} in torch"


def smaller_alternative(config: Mapping, label: str, available: int, **run) -> str:
    """What would fit instead, for an inference refusal: the most precise lighter backend (bf16, the int8 graph,
    the int4 graph) at the same context, else a smaller context, else a smaller model. Random weights are not
    an alternative: they weigh what the real ones do."""
    half = "bf16 torch" if label.split()[1] == "torch" else "fp16 graph"
    lighter = [other for other in (half, "int8 graph", "int4 graph")
               if backend_bytes(config, other) < backend_bytes(config, label)]
    for other in lighter:
        e = inference_estimate(config, other, **run)
        if e.resident_bytes <= available:
            name = "the model in bfloat16" if other == "bf16 torch" else f"the {other}"
            return f"run {name} instead (~{gb(e.resident_bytes)} at this context)"
    for other in (label, *lighter):
        if inference_estimate(config, other, **{**run, "context": 1, "prompt_tokens": 1}).resident_bytes <= available:
            where = "" if other == label else f" with the {other}"
            return f"ask for a smaller context{where} (fewer positions or rows: the KV cache and activations grow with both)"
    smallest = inference_estimate(config, "int4 graph", **{**run, "context": 1, "prompt_tokens": 1})
    return f"pick a smaller model (even its int4 graph needs ~{gb(smallest.resident_bytes)})"


def check_fits(config: Mapping, stage: str, model: str = "", precision: str | None = None,
               available: int | None = None, **run) -> Estimate:
    """Refuse (InsufficientMemoryError, one line with the numbers) when the stage's estimate exceeds the memory
    available now; returns the estimate otherwise. ``inference``: see ``estimate``; the refusal names what would
    fit (``smaller_alternative``)."""
    e = estimate(config, stage, precision, **run)
    available = available_bytes() if available is None else available
    if e.resident_bytes > available:
        if stage == "inference":
            label = e.stage.removeprefix("inference ")
            what, advice = backend_words(label), smaller_alternative(config, label, available, **run)
        else:
            what, advice = WHAT.get(e.stage, e.stage), "free memory, or pick a smaller model"
        raise InsufficientMemoryError(
            f"{model or 'this model'} {what} needs ~{gb(e.resident_bytes)} resident; this machine has "
            f"{gb(available)} available ({e.formula}): {advice}")
    return e


def check_disk(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse (InsufficientDiskError) when the file system of ``folder`` has less than ``needed`` bytes free."""
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise InsufficientDiskError(f"{what} writes ~{gb(needed)} to {folder}; it has {gb(free)} free")


def config_of_inputs(inputs: Mapping[str, str | os.PathLike]) -> dict | None:
    """The config.json of the first stage input folder that has one (a package or checkpoint)."""
    for folder in inputs.values():
        path = Path(folder) / "config.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return None


def verification_fits(config: Mapping, precision: str | None, available: int | None = None) -> tuple[bool, str]:
    """Whether a compile can load its graph to verify it here, and the line that says why not: past this machine's
    memory a quantized graph is built (its weights written one by one) and its verification left to a machine that
    can hold it, as inference must be. (fp32/fp16 graphs are not built unverified: fp16's range probe runs the
    whole reference.)"""
    e = estimate(config, "compiled", precision)
    available = available_bytes() if available is None else available
    if e.resident_bytes <= available:
        return True, ""
    return False, (f"verification skipped: loading the graph needs ~{gb(e.resident_bytes)} resident and this machine "
                   f"has {gb(available)} available; verify it where it runs (`qwen2lib compile` there)")


def check_stage(stage: str, request: Mapping, inputs: Mapping[str, str | os.PathLike]) -> None:
    """The check ``stages.ensure_stage`` runs before building ``stage`` (nothing for stages it has no figure for).
    A compile whose verification does not fit is checked by its build alone (``verification_fits``)."""
    config = config_of_inputs(inputs)
    if config is None or stage not in ("calibration", "quantized", "compiled", "exported"):
        return
    precision = (request.get("config") or {}).get("precision") if stage == "compiled" else None
    model = str(config.get("_name_or_path") or Path(next(iter(inputs.values()))).name)
    if stage == "compiled" and precision in ("int8", "int4") and not verification_fits(config, precision)[0]:
        stage = "compiled unverified"
    if stage == "exported" and not request.get("verify_blocks"):
        stage = "exported unverified"
    if stage == "quantized" and request.get("scheme") in ("awq", "gptq"):  # both run the calibration blocks
        stage = "quantized gptq"
    check_fits(config, stage, model, precision)


def describe(model: str = "tiny", context: int = 4096):
    """Notebook first cells: one row per stage with its estimated resident memory, against what is available."""
    import pandas as pd  # heavy and optional: only this function needs it


    config = resolve(model).config
    available = available_bytes()
    rows = {label: {"resident GB": round(e.resident_bytes / 1e9, 2), "fits": e.resident_bytes <= available,
                    "formula": e.formula} for label, e in stage_estimates(config, context=context).items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = (f"{model}: {parameter_counts(config)['total'] / 1e9:.2f} B parameters, "
                        f"{available / 1e9:.1f} GB available now")
    return table
