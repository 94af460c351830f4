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
    inference       the graph's weights plus a KV cache of ``context`` positions for ``batch`` rows
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


def backend_bytes(config: Mapping, label: str) -> int:
    """The weights one of notebook 05's backends holds ("fp32 torch", "fp16 graph", "int8 torch smoothquant", ...):
    4 B a parameter in fp32, 2 in fp16, the int8 graph's bytes for an int8 package or graph."""
    precision = label.split()[0]
    if precision == "int8":
        return int8_graph_bytes(config)
    return (2 if precision == "fp16" else 4) * parameter_counts(config)["total"]


def kv_cache_bytes(config: Mapping, context: int, batch: int = 1, dtype_bytes: int = 4) -> int:
    s = shape_numbers(config)
    return 2 * s["L"] * s["n_kv"] * s["hd"] * context * batch * dtype_bytes


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
    acts = bsz * seq_len * (3 * s["I"] + s["n_h"] * seq_len + 4 * s["H"]) * 4
    int8 = int8_graph_bytes(config)
    fp32 = 4 * P
    R = RUNTIME_BYTES
    verify = fidelity_logits_bytes(s["V"]) + 6 * layer
    quantized = R + DATA_BYTES + 12 * layer + min(SHARD_BYTES, P) + 2 * big + verify
    # GPTQ: the blocks' hidden states and a batch's activations, H = E[x x^T] of the widest input (down_proj's),
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
        "inference int8": Estimate("inference int8", R + int8 + kv_cache_bytes(config, context, batch),
                                   f"runtime + int8 graph + fp32 KV cache ({batch} x {context} positions)"),
    }


def estimate(config: Mapping, stage: str, precision: str | None = None) -> Estimate:
    """The estimate of one stage (``compiled`` and ``inference`` by precision; fp16 graphs count as fp32 here:
    their range probe runs the whole fp32 reference)."""
    estimates = stage_estimates(config)
    if stage in ("compiled", "inference"):
        label = f"{stage} {'int8' if precision in ('int8', 'int4') else 'fp32'}"
        if label not in estimates:  # inference fp32: the fp32 graph plus the same cache
            e = estimates["inference int8"]
            extra = 4 * parameter_counts(config)["total"] - int8_graph_bytes(config)
            return Estimate(label, e.resident_bytes + extra, e.formula.replace("int8", "fp32"))
        return estimates[label]
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
    return f"{n / 1e9:.0f} GB" if n >= 10e9 else f"{n / 1e9:.1f} GB"


WHAT = {"checkpoint": "random checkpoint build", "quantized": "quantize", "quantized gptq": "GPTQ quantize",
        "exported": "export",
        "compiled fp32": "fp32 graph compile", "compiled int8": "int8 graph compile",
        "compiled unverified": "graph compile (unverified)", "exported unverified": "export (unverified)", "inference int8": "int8 graph",
        "inference fp32": "fp32 graph"}


def check_fits(config: Mapping, stage: str, model: str = "", precision: str | None = None,
               available: int | None = None) -> Estimate:
    """Refuse (InsufficientMemoryError, one line with the numbers) when the stage's estimate exceeds the memory
    available now; returns the estimate otherwise."""
    e = estimate(config, stage, precision)
    available = available_bytes() if available is None else available
    if e.resident_bytes > available:
        what = WHAT.get(e.stage, e.stage)
        raise InsufficientMemoryError(
            f"{model or 'this model'} {what} needs ~{gb(e.resident_bytes)} resident; this machine has "
            f"{gb(available)} available ({e.formula}): free memory, or pick a smaller model")
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
    if stage == "quantized" and request.get("scheme") == "gptq":
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
