"""Notebook 04: compile a Qwen2 checkpoint into an ONNX graph that onnxruntime runs, driven by a YAML.

    path = compile_model("configs/qwen2_int8.yaml", model="tiny", workdir="runs/tiny")
    path = ensure_compiled("tiny", "auto", "runs/tiny", config="qwen2_int8")   # reuse or build
    qwen2lib compile configs/qwen2_int8.yaml --model tiny [--set graph.last_position_logits=true]

Phases (each printed with its time): config -> source weights -> int8 weights (notebook 03's or
quantized here) -> fp16 range probe -> graph build -> save + onnx.checker -> verification against
the torch fp32 reference (parity over a prompt and cached decode steps; fidelity report on
held-out text) -> manifest. The folder ``<workdir>/compiled/<config name>/`` is written atomically:

    model.onnx [+ model.onnx.data]   the graph (weights outside it when over 2 GB)
    config.json, tokenizer files     from the checkpoint, so the folder runs on its own
    manifest.json                    config used, opsets, I/O names and shapes, precision per weight
                                     group, op histogram, file hashes, parity and fidelity results
    metrics.json                     the figures notebook 04 reports

The graph itself is built or traced by ``qwen2lib.graph``, whose ``OnnxCausalLM`` runs it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import transformers
import yaml
from safetensors.torch import load_file

from . import __version__
from .artifacts import check_replaceable, default_workdir, read_metrics, stage_dir
from .config_schema import ConfigError, load_config
from .corpus import heldout_token_blocks
from .errors import NumericalOverflowError, Qwen2LibError
from .fidelity import fidelity_report
from .loading import check_safetensors, check_weights_match_config, checkpoint_dir, load_model
from .model import Qwen2Args
from .graph import (FP16_MAX, GraphPlan, OnnxCausalLM, build_graph, check_finite, export_package_graph, io_signature,
                    op_histogram, weight_precision)
from .deploy import ensure_patched, load_deploy_package
from .quantization import ensure_quantized
from .stages import ensure_stage
from .tokenizer import load_tokenizer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MANIFEST_FORMAT = "qwen2lib-compiled/1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja")
_DTYPE = {"fp32": "float32", "fp16": "float16", "int8": "float32"}


class CompileVerificationError(Qwen2LibError, RuntimeError):
    """The compiled graph misses a parity or fidelity bound of its config; nothing was installed."""


def config_path(config: str | os.PathLike) -> Path:
    """A YAML path, or the name of one shipped in configs/ (``qwen2_int8`` or ``qwen2_int8.yaml``)."""
    path = Path(config)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"compile config {config} does not exist; shipped configs: {shipped}")


class _Phases:
    """Prints ``[compile name] (i/n) phase ... done in s`` so long compiles show where they are."""

    NAMES = ("config", "source weights", "int8 weights", "fp16 range probe", "graph build", "save + onnx.checker",
             "verify vs torch", "manifest")

    def __init__(self, name: str, verbose: bool):
        self.name, self.verbose, self.timings = name, verbose, {}

    def __call__(self, phase: str, note: str = ""):
        phases = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()
                if phases.verbose:
                    i = phases.NAMES.index(phase) + 1
                    print(f"[compile {phases.name}] ({i}/{len(phases.NAMES)}) {phase}{': ' + note if note else ''} ...",
                          flush=True)

            def __exit__(self, *exc):
                dt = time.perf_counter() - self.t0
                phases.timings[phase] = round(dt, 3)
                if phases.verbose and exc[0] is None:
                    print(f"[compile {phases.name}]     done in {dt:.1f} s", flush=True)

        return _Ctx()


# ---- source ------------------------------------------------------------------------------------

@dataclass
class Source:
    model_id: str
    folder: Path  # checkpoint (or deploy package) folder
    config: dict  # its config.json
    args: Qwen2Args
    weights: dict[str, np.ndarray]  # float32, Hugging Face names


def _source_folder(cfg: dict, model: str, weights: str, seed: int, workdir: Path, verbose: bool) -> Path:
    """The folder whose config and weights the graph is built from: notebook 01's deploy package (default),
    or the raw checkpoint (``source.package: checkpoint``, to study the builder on its own)."""
    if cfg["source"]["package"] == "patched":
        return Path(ensure_patched(model, weights, workdir, seed=seed, verbose=verbose))
    return Path(checkpoint_dir(model, weights, seed))


def load_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors as float32 numpy (bf16 checkpoints upcast exactly)."""
    check_weights_match_config(folder)
    out = {}
    for shard in check_safetensors(folder):
        for name, tensor in load_file(shard).items():
            out[name] = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
    return out


def read_quantized_package(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Notebook 03's package -> (float tensors, {"<linear>.weight": (int8 (N, K), scales)}).

    An int8 tensor ``X.weight`` pairs with a float ``X.weight_scale`` / ``X.weight_scales`` / ``X.scale`` /
    ``X.scales`` (N,) or (N, 1). Float tensors (norms changed by SmoothQuant, unquantized Linears) are
    returned too, so they replace the checkpoint's.
    """
    tensors = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(shard))
    floats, quantized = {}, {}
    for name, t in tensors.items():
        if t.dtype == torch.int8:
            stem = name[: -len(".weight")] if name.endswith(".weight") else name
            scale = next((tensors[k] for k in (f"{stem}.weight_scale", f"{stem}.weight_scales", f"{stem}.scale",
                                                f"{stem}.scales") if k in tensors), None)
            if scale is None:
                raise ConfigError(f"{folder}: int8 tensor {name} has no scale tensor ({stem}.weight_scale or "
                                  f"{stem}.scale); cannot rebuild its float values")
            quantized[f"{stem}.weight"] = (t.numpy(), scale.float().numpy().reshape(t.shape[0], -1))
        elif t.is_floating_point() and not any(name.endswith(s) for s in ("_scale", "_scales", ".scale", ".scales")):
            floats[name] = t.float().numpy()
    if not quantized:
        raise ConfigError(f"{folder} holds no int8 weights: is it notebook 03's quantized package?")
    return floats, quantized


def _int8_folder(cfg, model, weights, seed, workdir, verbose) -> Path | None:
    """The quantized package int8 weights come from: ``quantization.package`` when named, else notebook 03's
    ``quantized/<quantization.from_scheme>`` (built when missing) for a graph of the deploy package; None
    when compiling the raw checkpoint, whose weights the shared quantizer (``qwen2lib.int8``) rounds here."""
    q = cfg["quantization"]
    if cfg["precision"] != "int8":
        return None
    if q["package"]:
        return Path(q["package"])
    if cfg["source"]["package"] == "patched":
        return Path(ensure_quantized(model, weights, workdir, seed=seed, scheme=q["from_scheme"], verbose=verbose))
    return None


def _int8_weights(cfg, folder: Path | None, source: Source) -> tuple[dict, str]:
    """({"<linear>.weight": (int8, scales)}, label); empty when the graph builder quantizes itself."""
    if folder is None:
        return {}, (f"quantized here (source.package: checkpoint) by qwen2lib.int8: "
                    f"{cfg['quantization']['granularity'].replace('_', '-')} symmetric int8")
    floats, quantized = read_quantized_package(folder)
    source.weights.update({k: v for k, v in floats.items() if k in source.weights})
    return quantized, (f"notebook 03 package {folder} ({len(quantized)} int8 weights and their scales; groups "
                       "it left in float are rounded here by the same quantizer, qwen2lib.int8)")


# ---- verification data ---------------------------------------------------------------------------

def verify_tokens(folder: Path, vocab_size: int, n_blocks: int, block_tokens: int, seed: int) -> tuple[torch.Tensor, str]:
    """(n_blocks, block_tokens) token ids and what they are: held-out text (``qwen2lib.corpus``: standard
    library files the tiny model never trained on) when the folder has a tokenizer that fits the
    vocabulary, else seeded random ids (test checkpoints with a toy vocabulary)."""
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        ids = heldout_token_blocks(load_tokenizer(str(folder)), n_blocks, block_tokens, seed=seed)
        if int(ids.max()) < vocab_size:
            return ids, "held-out Python stdlib files (qwen2lib.corpus)"
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n_blocks, block_tokens), generator=gen), f"random token ids (seed {seed})"


def reference_logits_fn(hf_model):
    """ids (B, T) -> float32 logits (B, T, V) of the torch reference, no cache."""

    @torch.no_grad()
    def fn(ids):
        return hf_model(input_ids=torch.as_tensor(ids), use_cache=False).logits.float()

    return fn


def decode_parity(reference, lm: OnnxCausalLM, prompt: torch.Tensor, steps: int) -> dict:
    """Graph prefill + ``steps`` cached greedy decode steps vs the reference on the same tokens (no cache).

    Returns max |dlogits| over the prompt positions, over the decode steps and overall, per position,
    and the share of greedy tokens that agree.
    """
    logits, state = lm.prefill(prompt.numpy())
    check_finite(logits, state.past, "prefill")
    seq = prompt[0].tolist()
    first = len(seq) - logits.shape[1]
    rows = {first + t: logits[0, t] for t in range(logits.shape[1])}
    for _ in range(steps):
        seq.append(int(np.argmax(logits[0, -1])))
        logits, state = lm.decode([[seq[-1]]], state)
        check_finite(logits, state.past, f"decode step at position {len(seq) - 1}")
        rows[len(seq) - 1] = logits[0, -1]
    ref = reference(torch.tensor([seq]))[0].numpy()  # (N, V)
    P = prompt.shape[1]
    diff = {pos: float(np.abs(row - ref[pos]).max()) for pos, row in rows.items()}
    prompt_d = [d for p, d in diff.items() if p < P]
    decode_d = [d for p, d in diff.items() if p >= P]
    agree = sum(int(np.argmax(rows[p]) == np.argmax(ref[p])) for p in rows if p >= P - 1)
    return {"max_abs_dlogits": max(diff.values()), "max_abs_dlogits_prompt": max(prompt_d),
            "max_abs_dlogits_decode": max(decode_d) if decode_d else None, "prompt_tokens": P, "decode_steps": steps,
            "greedy_agreement": agree / sum(1 for p in rows if p >= P - 1),
            "per_position": [diff[p] for p in sorted(diff)]}  # max |dlogits| at each compared position


def fidelity(reference, candidate, blocks: torch.Tensor) -> dict:
    """The fidelity report (``qwen2lib.fidelity``) of a candidate ids -> logits callable; a candidate
    that emits inf/NaN raises NumericalOverflowError instead of producing NaN figures."""
    unchecked = candidate

    def candidate(ids):
        out = unchecked(ids)
        if not torch.isfinite(out).all():
            raise NumericalOverflowError("the compiled graph's logits on the held-out blocks hold inf/NaN: an "
                                         "activation overflowed its dtype")
        return out

    report = fidelity_report(reference, candidate, blocks)
    report = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    return {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in report.items()
            if not isinstance(v, (torch.Tensor, np.ndarray, list))}


# ---- fp16 range probe --------------------------------------------------------------------------

@torch.no_grad()
def activation_ranges(hf_model, blocks: torch.Tensor) -> dict[str, float]:
    """Largest |activation| of every tensor fp16 would hold, on the probe text, in the fp32 reference.

    Keys: ``embed_tokens``, ``layers.{i}.residual`` (the stream after block i), ``layers.{i}.{q,k,v,o}_proj``,
    ``layers.{i}.{gate,up,down}_proj``, ``layers.{i}.act`` (input of down_proj), ``lm_head``.
    """
    ranges: dict[str, float] = {}
    hooks = []

    def record(key):
        def hook(_module, inputs, output):
            t = output[0] if isinstance(output, tuple) else output
            ranges[key] = max(ranges.get(key, 0.0), float(t.detach().abs().max()))
        return hook

    def record_input(key):
        def hook(_module, inputs):
            ranges[key] = max(ranges.get(key, 0.0), float(inputs[0].detach().abs().max()))
        return hook

    base = hf_model.model
    hooks.append(base.embed_tokens.register_forward_hook(record("embed_tokens")))
    for i, layer in enumerate(base.layers):
        hooks.append(layer.register_forward_hook(record(f"layers.{i}.residual")))
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            hooks.append(getattr(layer.self_attn, n).register_forward_hook(record(f"layers.{i}.{n}")))
        for n in ("gate_proj", "up_proj", "down_proj"):
            hooks.append(getattr(layer.mlp, n).register_forward_hook(record(f"layers.{i}.{n}")))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(record_input(f"layers.{i}.act")))
        # the residual after attention (before the MLP adds to it) is the post-attention norm's input
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(record_input(f"layers.{i}.residual_mid")))
    hooks.append(hf_model.lm_head.register_forward_hook(record("lm_head")))
    try:
        hf_model(input_ids=blocks, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return ranges


def fp16_plan(ranges: dict[str, float], headroom: float, on_overflow: str) -> tuple[frozenset, dict]:
    """Which parts must run in fp32 for an fp16 graph; raises NumericalOverflowError when asked to, or
    when the part cannot be kept (queries/keys/values feed the fp16 attention and KV cache)."""
    limit = FP16_MAX / headroom
    over = {k: v for k, v in ranges.items() if v > limit}
    keep, fatal = set(), []
    for key in over:
        parts = key.split(".")
        if key == "embed_tokens" or parts[-1] in ("residual", "residual_mid"):
            keep.add("residual")
        elif key == "lm_head":
            keep.add("lm_head")
        elif parts[-1] == "o_proj":
            keep.update({f"layers.{parts[1]}.attention", "residual"})
        elif parts[-1] in ("q_proj", "k_proj", "v_proj"):
            fatal.append(key)
        else:  # gate/up/down/act
            keep.update({f"layers.{parts[1]}.mlp", "residual"})
    listing = ", ".join(f"{k} reaches {v:.3g}" for k, v in sorted(over.items(), key=lambda kv: -kv[1]))
    if fatal:
        raise NumericalOverflowError(
            f"fp16 cannot hold {', '.join(fatal)} (largest |activation| > 65504/{headroom:g} on the probe text: "
            f"{listing}); these feed the fp16 attention and KV cache. Compile with qwen2_fp32.yaml or qwen2_int8.yaml")
    if over and on_overflow == "error":
        raise NumericalOverflowError(
            f"fp16 would overflow: {listing} (limit 65504/{headroom:g} = {limit:.0f}; bf16-trained checkpoints "
            "often exceed fp16's range). Set fp16.on_overflow: keep_fp32 to run those parts in fp32, "
            "or compile with qwen2_fp32.yaml")
    report = {"limit": limit, "largest": dict(sorted(ranges.items(), key=lambda kv: -kv[1])[:8]),
              "over_limit": over, "kept_in_fp32": sorted(keep)}
    return frozenset(keep), report


# ---- the compile ---------------------------------------------------------------------------------

def per_block_projections(cfg: dict, int8_folder: Path | None) -> tuple[list[str], str]:
    """The projections whose activations stay per block, and why: as listed in the YAML, or (``auto``) as the
    calibration statistics recorded with the quantized package decide (``quantization.activation_outliers``)."""
    listed = cfg["quantization"]["per_block_projections"]
    if listed != "auto":
        return list(listed), "listed in the config"
    outliers = read_metrics(int8_folder).get("activation_outliers") if int8_folder else None
    if not outliers:
        raise ConfigError(f"per_block_projections: auto needs the activation statistics a quantized package of "
                          f"notebook 03 records; {int8_folder} has none (rebuild it, or list the projections)")
    ratios = ", ".join(f"{p} {r:.1f}" for p, r in outliers["max_over_median"].items())
    return list(outliers["per_block_projections"]), (f"calibration statistics: input max/median channel "
                                                     f"{ratios}; per block at >= {outliers['threshold']:g}")


def _plan(cfg: dict, args: Qwen2Args, keep_fp32=frozenset(), hf_config: dict | None = None,
          per_block: list[str] = ()) -> GraphPlan:
    """The graph plan: the YAML's choices, with what the package's config.json decides (insert_slice ->
    last-position logits, unless graph.last_position_logits says otherwise) and the resolved per-block list."""
    g, q = cfg["graph"], cfg["quantization"]
    last = g["last_position_logits"]
    if last is None:
        last = bool((hf_config or {}).get("insert_slice", False))
    axes = {k: (k if v == "dynamic" else int(v)) for k, v in g["dynamic_axes"].items()}
    return GraphPlan(
        operator_set=g["operator_set"], opset=g["opset"], dtype=_DTYPE[cfg["precision"]],
        quantize=tuple(q["modules"]) if cfg["precision"] == "int8" else (),
        block_size=q["block_size"], granularity=q["granularity"],
        activations=q["activations"], per_block_projections=tuple(per_block) if q["activations"] == "int8_per_tensor" else (),
        max_sequence_length=g["max_sequence_length"] or args.max_position_embeddings,
        batch=axes["batch"], sequence=axes["sequence"], past_sequence=axes["past_sequence"],
        last_position_logits=last, keep_fp32=keep_fp32,
    )


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_bounds(cfg: dict, parity: dict, fid: dict, random_weights: bool = False) -> list[str]:
    """Bounds of ``verify`` that the graph misses. With random weights the logits are near-flat over the
    vocabulary, so which token is the argmax is a coin toss: top-1 agreement is reported, not bounded."""
    v = cfg["verify"]
    failures = []
    # written as "not <=" so that a NaN figure fails its bound
    if v["max_abs_dlogits"] is not None and not parity["max_abs_dlogits"] <= v["max_abs_dlogits"]:
        failures.append(f"parity max |dlogits| {parity['max_abs_dlogits']:.3g} > verify.max_abs_dlogits "
                        f"{v['max_abs_dlogits']:g}")
    if v["max_kld_mean"] is not None and not fid["kld_mean"] <= v["max_kld_mean"]:
        failures.append(f"kld_mean {fid['kld_mean']:.3g} > verify.max_kld_mean {v['max_kld_mean']:g}")
    if v["min_top1_agreement"] is not None and not random_weights and not fid["top1_agreement"] >= v["min_top1_agreement"]:
        failures.append(f"top1_agreement {fid['top1_agreement']:.4f} < verify.min_top1_agreement "
                        f"{v['min_top1_agreement']:g}")
    if v["max_ppl_ratio"] is not None and not fid["ppl_ratio"] <= v["max_ppl_ratio"]:
        failures.append(f"ppl_ratio {fid['ppl_ratio']:.4f} > verify.max_ppl_ratio {v['max_ppl_ratio']:g}")
    return failures


def compile_model(config: str | os.PathLike | dict, model: str | None = None, weights: str | None = None,
                  workdir: str | os.PathLike | None = None, *, seed: int = 0, overrides: dict | None = None,
                  out_dir: str | os.PathLike | None = None, verbose: bool = True, force: bool = True) -> Path:
    """Compile per a YAML config (path, shipped name or dict) into ``<workdir>/compiled/<name>/``; returns it.

    The graph is built from notebook 01's deploy package (fp32, fp16) or notebook 03's quantized package
    (int8), each ensured first (``source.package: checkpoint`` builds from the raw checkpoint instead).
    ``model``/``weights`` override the config's ``source``; ``overrides`` maps dotted keys to values
    (``{"graph.opset": 17}``). ``force=False`` reuses a folder built from the same inputs, config and code
    (``ensure_compiled``). Raises ConfigError on a bad config, NumericalOverflowError when fp16 cannot hold
    the model, CompileVerificationError when the graph misses its bounds (nothing is installed then).
    """
    cfg = load_config(config if isinstance(config, dict) else config_path(config), overrides)
    src = cfg["source"]
    model = model or src["checkpoint"] or src["model"] or "tiny"
    weights = weights or src["weights"] or "auto"
    workdir = Path(workdir) if workdir else default_workdir(model)
    final = Path(out_dir) if out_dir else stage_dir(workdir, "compiled", cfg["name"])
    check_replaceable(final)  # before any slow work: never replace a folder qwen2lib did not write
    folder = _source_folder(cfg, model, weights, seed, workdir, verbose)
    int8_folder = _int8_folder(cfg, model, weights, seed, workdir, verbose)
    inputs = {"source": folder, **({"int8_package": int8_folder} if int8_folder else {})}
    request = {"config": {k: v for k, v in cfg.items() if k != "_source"}, "seed": seed}

    def build(tmp: Path) -> dict:
        return _compile_into(tmp, cfg, folder, int8_folder, str(model), weights, seed, verbose)

    out = ensure_stage("compiled", final, request, inputs, build, force=force, verbose=verbose)
    if verbose:
        print(f"[compile {cfg['name']}] {out}", flush=True)
    return out


def _load_source(cfg: dict, folder: Path, int8_folder: Path | None, model: str, phases) -> tuple:
    """(Source, int8 weights, their label): the package's config and float weights, and the int8 ones."""
    with phases("source weights", str(folder)):
        hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        source = Source(model, folder, hf_config, Qwen2Args.from_config_dict(hf_config), load_weights(folder))
    with phases("int8 weights", "yes" if cfg["precision"] == "int8" else "not needed"):
        quantized, label = _int8_weights(cfg, int8_folder, source) if cfg["precision"] == "int8" else ({}, None)
    return source, quantized, label


def traced(cfg: dict, folder: Path) -> bool:
    """The standard-ops fp32 graph of a deploy package is traced from its model (``qwen2lib.graph.trace``), as the
    guide's compiler does; every other graph is built node by node (``qwen2lib.graph.builder``)."""
    return (cfg["graph"]["operator_set"] == "standard" and cfg["precision"] == "fp32"
            and (folder / "patches.json").is_file())


def load_reference(folder: Path):
    """The torch fp32 reference a graph is checked against: the deploy package it was built from (its code
    checked first), or the plain transformers model of a raw checkpoint."""
    if (folder / "patches.json").is_file():
        model = load_deploy_package(folder, torch.float32)
        model.config.insert_slice = False  # the reference scores every position; a sliced graph is walked per step
        return model
    return load_model(str(folder), dtype=torch.float32)


def _compile_into(tmp: Path, cfg: dict, folder: Path, int8_folder: Path | None, model: str, weights: str,
                  seed: int, verbose: bool) -> dict:
    """Build, save, check and verify the graph into ``tmp``; returns the metrics (manifest.json written too)."""
    phases = _Phases(cfg["name"], verbose)
    with phases("config", cfg["_source"] or "dict"):
        pass
    source, quantized, quant_label = _load_source(cfg, folder, int8_folder, model, phases)
    v = cfg["verify"]
    blocks, text_label = verify_tokens(folder, source.args.vocab_size, v["blocks"], v["block_tokens"], seed)
    reference_model, keep, probe = None, frozenset(), None  # at 7B+ weights, graph and reference do not all fit
    with phases("fp16 range probe", "yes" if cfg["precision"] == "fp16" else "not needed"):
        if cfg["precision"] == "fp16":
            reference_model = load_reference(folder)
            keep, probe = fp16_plan(activation_ranges(reference_model, blocks), cfg["fp16"]["headroom"],
                                    cfg["fp16"]["on_overflow"])
            if verbose and keep:
                print(f"[compile {cfg['name']}]     kept in fp32 (fp16 would overflow): {', '.join(sorted(keep))}")
    per_block, per_block_reason = per_block_projections(cfg, int8_folder) if cfg["precision"] == "int8" else ([], None)
    plan = _plan(cfg, source.args, keep, source.config, per_block)
    external = {"auto": None, "always": True, "never": False}[cfg["graph"]["external_data"]]
    if traced(cfg, folder):
        with phases("graph build", "torch.onnx.export of the deploy package's model (standard ops, fp32)"):
            reference_model = load_reference(folder)
            reference_model.config.insert_slice = plan.last_position_logits  # the graph computes what the plan says
            files = export_package_graph(reference_model, tmp, opset=cfg["graph"]["opset"], external=external,
                                         max_positions=plan.max_sequence_length)
            reference_model.config.insert_slice = False  # as a reference it scores every position
            histogram, precision = op_histogram(tmp / "model.onnx"), weight_precision(source.args, plan)
            source.weights.clear()
    else:
        with phases("graph build", f"{plan.operator_set} ops, {cfg['precision']}"):
            built = build_graph(source.args, source.weights, plan, quantized)
            source.weights.clear()  # the graph holds its own (transposed, cast or packed) copies
            files = built.save(tmp, external)
            histogram, precision = op_histogram(built), built.precision
            del built
    with phases("save + onnx.checker"):
        onnx.checker.check_model(str(tmp / "model.onnx"))
        for name in ("config.json",) + TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
    with phases("verify vs torch", f"{v['prompt_tokens']}-token prompt + {v['decode_steps']} decode steps, "
                                   f"{v['blocks']}x{v['block_tokens']} tokens of {text_label}"):
        parity, fid = _verify(tmp, cfg, plan, reference_model or load_reference(folder), blocks, source.config)
        del reference_model
    with phases("manifest"):
        manifest = _manifest(tmp, cfg, plan, source, files, histogram, precision, probe, parity, fid, weights, seed,
                             quant_label, text_label, phases.timings)
    return {"name": cfg["name"], "model": model, "weights": weights, "seed": seed, "precision": cfg["precision"],
            "operator_set": plan.operator_set, "source": str(folder), "int8_package": str(int8_folder or ""),
            "graph_bytes": sum(f["bytes"] for n, f in manifest["files"].items() if n.startswith("model.onnx")),
            "last_position_logits": plan.last_position_logits,
            "per_block_projections": {"projections": list(plan.per_block_projections), "why": per_block_reason},
            "parity": parity, "fidelity": fid, "kept_in_fp32": sorted(keep)}


def _verify(tmp: Path, cfg: dict, plan: GraphPlan, reference_model, blocks: torch.Tensor, hf_config: dict):
    """Parity over a prompt + cached decode steps and the fidelity report; raises when a bound is missed."""
    v = cfg["verify"]
    reference = reference_logits_fn(reference_model)
    lm = OnnxCausalLM.load(tmp, manifest={"config": cfg, "max_sequence_length": plan.max_sequence_length,
                                          "operator_set": plan.operator_set})
    prompt = blocks.flatten()[: v["prompt_tokens"]][None]
    parity = decode_parity(reference, lm, prompt, v["decode_steps"])
    fid = fidelity(reference, lm, blocks)  # a last-position graph is walked token by token through its cache
    random_weights = bool(hf_config.get("qwen2lib_random_weights"))
    failures = check_bounds(cfg, parity, fid, random_weights)
    if random_weights:
        fid["note"] = "random weights: top-1 agreement reported, not bounded (near-flat logits)"
    if failures:
        raise CompileVerificationError(f"{cfg['name']}: the compiled graph misses its bounds: " + "; ".join(failures)
                                       + " (nothing installed)")
    return parity, fid


def _manifest(tmp, cfg, plan, source, files, histogram, precision, probe, parity, fid, weights, seed,
              quant_label, text_label, timings) -> dict:
    args, hf_config = source.args, source.config
    manifest = {
        "format": MANIFEST_FORMAT, "name": cfg["name"], "config": cfg,
        "source": {"model": source.model_id, "weights": weights, "seed": seed, "folder": str(source.folder),
                   "int8_weights": quant_label, "random_weights": bool(hf_config.get("qwen2lib_random_weights"))},
        "model_config": {k: hf_config.get(k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                       "num_hidden_layers", "num_attention_heads",
                                                       "num_key_value_heads", "tie_word_embeddings",
                                                       "max_position_embeddings", "rms_norm_eps", "insert_slice")},
        "graph": {"file": "model.onnx", "external_data": "model.onnx.data" if len(files) > 1 else None,
                  "opset": cfg["graph"]["opset"],
                  "opset_imports": {(o.domain or "ai.onnx"): o.version for o in _opsets(tmp)},
                  "nodes": sum(histogram.values())},
        "operator_set": plan.operator_set, "max_sequence_length": plan.max_sequence_length,
        "last_position_logits": plan.last_position_logits,
        "kv_cache": {"layout": "BNSH", "shape": ["batch", args.num_key_value_heads, "sequence", args.head_dim],
                     "dtype": plan.kv_dtype, "num_layers": args.num_hidden_layers},
        **io_signature(tmp / "model.onnx"),
        "precision": precision, "op_histogram": dict(histogram.most_common()), "fp16_probe": probe,
        "verify_text": text_label, "parity": parity, "fidelity": fid, "limits": _limits(plan),
        "timings_s": timings, "versions": _versions(),
    }
    manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
                         for p in sorted(tmp.iterdir()) if p.is_file() and p.name != "metrics.json"}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    return manifest


def _opsets(folder: Path):
    return onnx.load(str(folder / "model.onnx"), load_external_data=False).opset_import


def _limits(plan: GraphPlan) -> list[str]:
    out = ["attention_mask: 1 for real tokens, 0 for left padding only (right padding is not supported)",
           f"positions < {plan.max_sequence_length} (graph.max_sequence_length)",
           "logits are float32; present.* have the past_key_values.* dtype"]
    if plan.operator_set == "contrib":
        out.append("GroupQueryAttention: continuing a prompt (T > 1) over a non-empty past needs batch 1 "
                   "(OnnxCausalLM.run splits such calls by row)")
    if plan.last_position_logits:
        out.append("logits are for the last position only (B, 1, V)")
    return out


def _versions() -> dict:
    return {"qwen2lib": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__}


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: compile first (`qwen2lib compile CONFIG`)")
    return json.loads(path.read_text(encoding="utf-8"))


def ensure_compiled(model: str = "tiny", weights: str = "auto", workdir: str | os.PathLike | None = None, *,
                    config: str | os.PathLike | dict = "qwen2_fp32", seed: int = 0, overrides: dict | None = None,
                    verbose: bool = True) -> Path:
    """``<workdir>/compiled/<config name>/``, reused when built from the same packages, config and code,
    else compiled (``qwen2lib.stages`` says why)."""
    return compile_model(config, model, weights, workdir, seed=seed, overrides=overrides, verbose=verbose,
                         force=False)


# ---- command line --------------------------------------------------------------------------------

def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. graph.last_position_logits=true")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_compile(args) -> int:
    path = compile_model(config_path(args.config), args.model, args.weights, args.workdir, seed=args.seed,
                         overrides=_parse_set(args.set))
    manifest = read_manifest(path)
    parity = {k: v for k, v in manifest["parity"].items() if k != "per_position"}
    print(json.dumps({"folder": str(path), "precision": manifest["precision"], "parity": parity,
                      "fidelity": manifest["fidelity"]}, indent=2, default=str))
    return 0


def register_cli(sub) -> None:
    from .cli import add_model_args

    p = sub.add_parser("compile", help="compile a checkpoint to an ONNX graph per a YAML config (notebook 04)",
                       description="Compile to <workdir>/compiled/<config name>/: graph, tokenizer, manifest.json. "
                                   "The precision comes from the YAML; --dtype is not used.")
    p.add_argument("config", help="YAML config: a path or a shipped name (qwen2_fp32, qwen2_fp16, qwen2_int8)")
    add_model_args(p)
    p.set_defaults(model=None, weights=None, func=cmd_compile)  # None: the YAML's source decides
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set graph.last_position_logits=true (repeatable)")
