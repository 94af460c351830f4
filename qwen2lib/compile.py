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

The graph itself is built by ``qwen2lib.onnx_graph``; ``qwen2lib.ort_runtime.OnnxCausalLM`` runs it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artifacts import atomic_dir, check_replaceable, default_workdir, stage_dir, write_metrics
from .config_schema import ConfigError, load_config
from .errors import NumericalOverflowError, Qwen2LibError
from .model import Qwen2Args
from .onnx_graph import FP16_MAX, GraphPlan, build_graph, op_histogram, io_signature
from .ort_runtime import OnnxCausalLM, check_finite

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


def _source_folder(cfg: dict, model: str, weights: str, seed: int, workdir: Path) -> Path:
    from .loading import checkpoint_dir

    if cfg["source"]["package"] == "patched":
        try:
            from .patching import ensure_patched
        except ImportError as exc:
            raise ConfigError("source.package 'patched' needs qwen2lib.patching.ensure_patched (notebook 01), "
                              "which this checkout lacks; use source.package: checkpoint") from exc
        return Path(ensure_patched(model, weights, workdir, seed=seed))
    return Path(checkpoint_dir(model, weights, seed))


def load_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors as float32 numpy (bf16 checkpoints upcast exactly)."""
    from safetensors.torch import load_file

    from .loading import check_safetensors, check_weights_match_config

    check_weights_match_config(folder)
    out = {}
    for shard in check_safetensors(folder):
        for name, tensor in load_file(shard).items():
            out[name] = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
    return out


def checkpoint_fingerprint(folder: Path) -> str:
    """Cheap identity of a checkpoint: config.json bytes + each weight file's name, size and mtime."""
    h = hashlib.sha256((folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b"")
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def read_quantized_package(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Notebook 03's package -> (float tensors, {"<linear>.weight": (int8 (N, K), scales)}).

    An int8 tensor ``X.weight`` pairs with a float ``X.weight_scale`` / ``X.weight_scales`` / ``X.scale`` /
    ``X.scales`` (N,) or (N, 1). Float tensors (norms changed by SmoothQuant, unquantized Linears) are
    returned too, so they replace the checkpoint's.
    """
    from safetensors.torch import load_file

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


def _int8_folder(cfg, model, weights, seed, workdir) -> Path | None:
    """Where int8 weights come from, per ``quantization.package`` / ``reuse``; None: quantize here."""
    q = cfg["quantization"]
    if cfg["precision"] != "int8":
        return None
    if q["package"]:
        return Path(q["package"])
    if q["reuse"] == "notebook03":
        try:
            from .quantization import ensure_quantized
        except ImportError as exc:
            raise ConfigError("quantization.reuse 'notebook03' needs qwen2lib.quantization.ensure_quantized "
                              "(notebook 03), which this checkout lacks; use reuse: none") from exc
        return Path(ensure_quantized(model, weights, workdir, seed=seed, scheme="w8a16"))
    if q["reuse"] == "auto":  # notebook 03's per-channel package when it is there (SmoothQuant's otherwise)
        for scheme in ("w8a16", "smoothquant"):
            candidate = stage_dir(workdir, "quantized", scheme)
            if any(candidate.glob("*.safetensors")):
                return candidate
    return None


def _int8_weights(cfg, folder: Path | None, source: Source) -> tuple[dict, str]:
    """({"<linear>.weight": (int8, scales)}, label); empty when the graph builder quantizes itself."""
    if folder is None:
        return {}, f"quantized here: {cfg['quantization']['granularity'].replace('_', '-')} symmetric int8"
    floats, quantized = read_quantized_package(folder)
    source.weights.update({k: v for k, v in floats.items() if k in source.weights})
    return quantized, (f"notebook 03 package {folder} ({len(quantized)} int8 weights and their scales; "
                       "groups it left in float are quantized here)")


# ---- verification data ---------------------------------------------------------------------------

def verify_tokens(folder: Path, vocab_size: int, n_blocks: int, block_tokens: int, seed: int) -> tuple[torch.Tensor, str]:
    """(n_blocks, block_tokens) token ids and what they are: held-out text (``qwen2lib.corpus``: standard
    library files the tiny model never trained on) when the folder has a tokenizer that fits the
    vocabulary, else seeded random ids (test checkpoints with a toy vocabulary)."""
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        from .corpus import heldout_token_blocks
        from .tokenizer import load_tokenizer

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

    from .fidelity import fidelity_report

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

def _plan(cfg: dict, args: Qwen2Args, keep_fp32=frozenset()) -> GraphPlan:
    g, q = cfg["graph"], cfg["quantization"]
    axes = {k: (k if v == "dynamic" else int(v)) for k, v in g["dynamic_axes"].items()}
    return GraphPlan(
        operator_set=g["operator_set"], opset=g["opset"], dtype=_DTYPE[cfg["precision"]],
        quantize=tuple(q["modules"]) if cfg["precision"] == "int8" else (),
        block_size=q["block_size"], granularity=q["granularity"],
        activations=q["activations"], per_block_projections=tuple(q["per_block_projections"]),
        max_sequence_length=g["max_sequence_length"] or args.max_position_embeddings,
        batch=axes["batch"], sequence=axes["sequence"], past_sequence=axes["past_sequence"],
        last_position_logits=g["last_position_logits"], keep_fp32=keep_fp32,
    )


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _request(cfg: dict, model_id: str, weights: str, seed: int, folder: Path, int8_folder: Path | None) -> dict:
    """What a compiled folder was built from; ``ensure_compiled`` reuses it only on an exact match."""
    return {"model": model_id, "weights": weights, "seed": seed, "checkpoint": checkpoint_fingerprint(folder),
            "int8_package": checkpoint_fingerprint(int8_folder) if int8_folder else None,
            "config": {k: v for k, v in cfg.items() if k != "_source"}}


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
                  out_dir: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """Compile a checkpoint per a YAML config (path, shipped name or dict); returns the output folder.

    ``model``/``weights`` override the config's ``source``; ``overrides`` maps dotted keys to values
    (``{"graph.last_position_logits": True}``). Raises ConfigError on a bad config,
    NumericalOverflowError when fp16 cannot hold the model, CompileVerificationError when the graph
    misses its config's parity/fidelity bounds (nothing is installed then).
    """
    from .loading import load_model

    cfg = load_config(config if isinstance(config, dict) else config_path(config), overrides)
    phases = _Phases(cfg["name"], verbose)
    with phases("config", cfg["_source"] or "dict"):
        src = cfg["source"]
        model = model or src["checkpoint"] or src["model"] or "tiny"
        weights = weights or src["weights"] or "auto"
        workdir = Path(workdir) if workdir else default_workdir(model)
        final = Path(out_dir) if out_dir else stage_dir(workdir, "compiled", cfg["name"])
        check_replaceable(final)  # before any slow work: never replace a folder qwen2lib did not write
    with phases("source weights", str(model)):
        folder = _source_folder(cfg, model, weights, seed, workdir)
        hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        args = Qwen2Args.from_config_dict(hf_config)
        source = Source(str(model), folder, hf_config, args, load_weights(folder))
    with phases("int8 weights", "yes" if cfg["precision"] == "int8" else "not needed"):
        quantized, quant_label = ({}, None)
        int8_folder = _int8_folder(cfg, model, weights, seed, workdir)
        if cfg["precision"] == "int8":
            quantized, quant_label = _int8_weights(cfg, int8_folder, source)
    v = cfg["verify"]
    blocks, text_label = verify_tokens(folder, args.vocab_size, v["blocks"], v["block_tokens"], seed)
    reference_model = None  # loaded when first needed: at 7B+ the weights, the graph and the reference do not all fit
    keep, probe = frozenset(), None
    with phases("fp16 range probe", "yes" if cfg["precision"] == "fp16" else "not needed"):
        if cfg["precision"] == "fp16":
            reference_model = load_model(str(folder), dtype=torch.float32)
            ranges = activation_ranges(reference_model, blocks)
            keep, probe = fp16_plan(ranges, cfg["fp16"]["headroom"], cfg["fp16"]["on_overflow"])
            if verbose and keep:
                print(f"[compile {cfg['name']}]     kept in fp32 (fp16 would overflow): {', '.join(sorted(keep))}")
    plan = _plan(cfg, args, keep)
    with phases("graph build", f"{plan.operator_set} ops, {cfg['precision']}"):
        built = build_graph(args, source.weights, plan, quantized)
        source.weights.clear()  # the graph holds its own (transposed, cast or packed) copies
    with atomic_dir(final) as tmp:
        with phases("save + onnx.checker"):
            external = {"auto": None, "always": True, "never": False}[cfg["graph"]["external_data"]]
            files = built.save(tmp, external)
            import onnx

            onnx.checker.check_model(str(tmp / "model.onnx"))
            histogram = op_histogram(built)
            signature = io_signature(tmp / "model.onnx")
            precision = built.precision
            del built
            for name in ("config.json",) + TOKENIZER_FILES:
                if (folder / name).is_file():
                    shutil.copy2(folder / name, tmp / name)
        with phases("verify vs torch", f"{v['prompt_tokens']}-token prompt + {v['decode_steps']} decode steps, "
                                       f"{v['blocks']}x{v['block_tokens']} tokens of {text_label}"):
            if reference_model is None:
                reference_model = load_model(str(folder), dtype=torch.float32)
            reference = reference_logits_fn(reference_model)
            lm = OnnxCausalLM.load(tmp, manifest={"config": cfg, "max_sequence_length": plan.max_sequence_length,
                                                  "operator_set": plan.operator_set})
            prompt = blocks.flatten()[: v["prompt_tokens"]][None]
            parity = decode_parity(reference, lm, prompt, v["decode_steps"])
            fid = fidelity(reference, lm, blocks)
            random_weights = bool(hf_config.get("qwen2lib_random_weights"))
            failures = check_bounds(cfg, parity, fid, random_weights)
            if random_weights:
                fid["note"] = "random weights: top-1 agreement reported, not bounded (near-flat logits)"
            del lm, reference, reference_model
            if failures:
                raise CompileVerificationError(f"{cfg['name']}: the compiled graph misses its bounds: "
                                               + "; ".join(failures) + " (nothing installed)")
        with phases("manifest"):
            manifest = {
                "format": MANIFEST_FORMAT,
                "name": cfg["name"],
                "config": cfg,
                "request": _request(cfg, str(model), weights, seed, folder, int8_folder),
                "source": {"model": str(model), "weights": weights, "seed": seed, "folder": str(folder),
                           "int8_weights": quant_label, "random_weights": random_weights},
                "model_config": {k: hf_config.get(k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                               "num_hidden_layers", "num_attention_heads",
                                                               "num_key_value_heads", "tie_word_embeddings",
                                                               "max_position_embeddings", "rms_norm_eps")},
                "graph": {"file": "model.onnx", "external_data": "model.onnx.data" if len(files) > 1 else None,
                          "opset": cfg["graph"]["opset"],
                          "opset_imports": {(o.domain or "ai.onnx"): o.version for o in _opsets(tmp)},
                          "nodes": sum(histogram.values())},
                "operator_set": plan.operator_set,
                "max_sequence_length": plan.max_sequence_length,
                "last_position_logits": plan.last_position_logits,
                "kv_cache": {"layout": "BNSH", "shape": ["batch", args.num_key_value_heads, "sequence",
                                                         args.head_dim], "dtype": plan.kv_dtype,
                             "num_layers": args.num_hidden_layers},
                **signature,
                "precision": precision,
                "op_histogram": dict(histogram.most_common()),
                "fp16_probe": probe,
                "verify_text": text_label,
                "parity": parity,
                "fidelity": fid,
                "limits": _limits(plan),
                "timings_s": phases.timings,
                "versions": _versions(),
            }
            manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
                                 for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
            write_metrics(tmp, {"name": cfg["name"], "model": str(model), "weights": weights, "seed": seed,
                                "precision": cfg["precision"], "operator_set": plan.operator_set,
                                "graph_bytes": sum(f["bytes"] for n, f in manifest["files"].items()
                                                   if n.startswith("model.onnx")),
                                "parity": parity, "fidelity": fid, "kept_in_fp32": sorted(keep)})
    if verbose:
        print(f"[compile {cfg['name']}] wrote {final}", flush=True)
    return final


def _opsets(folder: Path):
    import onnx

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
    import onnx
    import onnxruntime
    import transformers

    from . import __version__

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
    """``<workdir>/compiled/<config name>/`` when its manifest matches this request (model, weights,
    seed, checkpoint fingerprint, full config) and its files are whole; otherwise compile it."""
    cfg = load_config(config if isinstance(config, dict) else config_path(config), overrides)
    workdir = Path(workdir) if workdir else default_workdir(model)
    final = stage_dir(workdir, "compiled", cfg["name"])
    # the checkpoint as it resolves now (fails early, with the loader's message, when there are no weights)
    folder = _source_folder(cfg, model, weights, seed, workdir)
    if (final / "manifest.json").is_file():
        manifest = read_manifest(final)
        whole = all((final / n).is_file() and (final / n).stat().st_size == f["bytes"]
                    for n, f in manifest.get("files", {}).items())
        int8_folder = _int8_folder(cfg, model, weights, seed, workdir)
        wanted = json.loads(json.dumps(_request(cfg, str(model), weights, seed, folder, int8_folder), default=str))
        if whole and manifest.get("request") == wanted:
            if verbose:
                print(f"[compile {cfg['name']}] reusing {final} (same model, weights, seed, checkpoint and config)")
            return final
    return compile_model(cfg, model, weights, workdir, seed=seed, overrides=None, verbose=verbose)


# ---- command line --------------------------------------------------------------------------------

def _parse_set(items: list[str]) -> dict:
    import yaml

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
