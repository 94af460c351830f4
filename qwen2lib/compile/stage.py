"""Notebook 04: compile a Qwen2 checkpoint into an ONNX graph that onnxruntime runs, driven by a YAML.

    path = compile_model("configs/qwen2_int8.yaml", model="tiny", workdir="runs/tiny")
    path = ensure_compiled("tiny", "auto", "runs/tiny", config="qwen2_int8")   # reuse or build
    qwen2lib compile configs/qwen2_int8.yaml --model tiny [--set graph.insert_slice=true]

Phases (each printed with its time): config -> source weights -> int8 weights (notebook 03's or
quantized here) -> fp16 range probe -> graph build -> save + onnx.checker -> verification against
the torch fp32 reference (parity over a prompt and cached decode steps; fidelity report on
held-out text) -> manifest. The folder ``<workdir>/compiled/<config name>/`` is written atomically:

    model.onnx [+ model.onnx.data]   the graph (weights outside it when over 256 MB)
    config.json, tokenizer files     from the checkpoint, so the folder runs on its own
    manifest.json                    config used, opsets, I/O names and shapes, precision per weight
                                     group, op histogram, file hashes, parity and fidelity results
    metrics.json                     the figures notebook 04 reports

The graph itself is built or traced by ``qwen2lib.compile``, whose ``OnnxCausalLM`` runs it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import transformers

from .. import __version__
from ..artifacts import check_replaceable, default_workdir, read_metrics, stage_dir
from .config_schema import CompileConfig, ConfigError, load_config
from ..model.long_context import dca_config_from_dict
from ..deploy import ensure_patched
from ..errors import MissingInputError, Qwen2LibError
from .plan import GraphPlan, activation_outliers, weight_precision
from .manifest import GRAPH_FILE, GraphManifest
from .runtime import OnnxCausalLM
from .builder import build_graph, io_signature, op_histogram
from .trace import export_package_graph
from ..model.footprint import verification_fits
from .plan import QUANTIZED
from ..evaluation.fidelity import logits_fn
from .reference import load_reference, streamed_reference, verify_tokens
from .verify import activation_ranges, check_bounds, decode_parity, fidelity, fp16_plan
from ..model.loading import check_weights_match_config, checkpoint_dir
from ..model.model_config import Qwen2Args
from ..model.tokenizer import TOKENIZER_FILES
from ..quantize.package_reader import read_quantized_package
from ..quantize.stage import DEFAULT_SETTINGS, default_settings, ensure_quantized
from ..stages.reuse import ensure_stage
from ..deploy.schemes import STATS_FILE, load_stats
from ..model.tensorio import TensorReader

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


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
    raise MissingInputError(f"compile config {config} does not exist; shipped configs: {shipped}")


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
    weights: FloatWeights  # float32 numpy by Hugging Face name, read lazily


def _source_folder(cfg: CompileConfig, model: str, weights: str, seed: int, workdir: Path, verbose: bool) -> Path:
    """The folder whose config and weights the graph is built from: notebook 01's deploy package (default),
    or the raw checkpoint (``source.package: checkpoint``, to study the builder on its own)."""
    if cfg.source.package == "patched":
        return Path(ensure_patched(model, weights, workdir, seed=seed, verbose=verbose))
    return Path(checkpoint_dir(model, weights, seed))


class FloatWeights(Mapping):
    """{Hugging Face name: float32 numpy} over a folder's safetensors, each tensor read when asked for (bf16
    checkpoints upcast exactly) and not kept: the graph builder holds one weight at a time. ``overrides`` (a
    quantized package's float tensors) take precedence over the folder's own."""

    def __init__(self, reader: TensorReader, overrides: Mapping | None = None):
        self.reader, self.overrides = reader, overrides or {}

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self.overrides[name] if name in self.overrides else self.reader[name]
        return tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()

    def __iter__(self):
        return iter(self.reader)

    def __len__(self) -> int:
        return len(self.reader)


def load_weights(folder: Path) -> FloatWeights:
    """Every tensor of the folder's safetensors as float32 numpy, read lazily (``FloatWeights``)."""
    check_weights_match_config(folder)
    return FloatWeights(TensorReader(folder))


def _int8_folder(cfg, model, weights, seed, workdir, verbose, package: Path) -> Path | None:
    """The quantized package int8 weights come from: ``quantization.package`` when named, else notebook 03's
    ``quantized/<quantization.from_scheme>`` (built when missing) for a graph of the deploy package; None
    when compiling the raw checkpoint or with ``from_scheme: null``: the shared quantizer
    (``qwen2lib.deploy.quantizer``) then rounds the source's fp32 weights here at the config's granularity."""
    q = cfg.quantization
    if not cfg.quantized:
        return None
    if q.package:
        return Path(q.package)
    if cfg.source.package == "patched" and q.from_scheme:
        return Path(ensure_quantized(model, weights, workdir, seed=seed, scheme=q.from_scheme, verbose=verbose,
                                     package=package))
    return None


def _int8_weights(cfg, folder: Path | None, source: Source) -> tuple[dict, str]:
    """({"<linear>.weight": (int8, scales) or Int4Weight}, label); empty when the graph builder quantizes itself."""
    if folder is None and cfg.precision == "int4":
        raise ConfigError("precision int4 takes its weights from notebook 03's int4 package: use source.package: "
                          "patched (or name one in quantization.package)", "precision")
    if folder is None:
        why = "source.package: checkpoint" if cfg.source.package == "checkpoint" else "from_scheme: null"
        return {}, (f"quantized here ({why}) by qwen2lib.deploy.quantizer: "
                    f"{cfg.quantization.granularity.replace('_', '-')} symmetric int8")
    floats, quantized = read_quantized_package(folder)
    source.weights = FloatWeights(source.weights.reader, floats)  # its float tensors replace the checkpoint's
    bits = "int4" if any(name in quantized.int4 for name in quantized) else "int8"
    return quantized, (f"notebook 03 package {folder} ({len(quantized)} {bits} weights and their scales; groups "
                       "it left in float are rounded here by the same quantizer, qwen2lib.deploy.quantizer)")


# ---- the compile ---------------------------------------------------------------------------------

def statistics_folder(cfg: CompileConfig, int8_folder: Path | None) -> Path | None:
    """Notebook 02's calibration folder the plan reads (``per_block_projections: auto``): the one the quantized
    package was calibrated on, as its metrics record; None when the config lists the projections."""
    q = cfg.quantization
    if q.per_block_projections != "auto" or q.activations != "int8_per_tensor" or int8_folder is None:
        return None
    recorded = read_metrics(int8_folder).get("calibration")
    folder = Path(recorded) if recorded else None
    if folder is None or not (folder / STATS_FILE).is_file():
        raise ConfigError(f"per_block_projections: auto reads the calibration statistics {int8_folder} was quantized "
                          f"from, and {folder or 'its metrics name none'} has no {STATS_FILE}: rebuild the package "
                          "(notebook 03), or list the projections", "quantization.per_block_projections")
    return folder


def per_block_projections(cfg: CompileConfig, statistics: Path | None) -> tuple[list[str], dict]:
    """The projections whose activations stay per block, and why: as listed in the YAML, or (``auto``) as the
    calibration statistics decide (``qwen2lib.compile.plan.activation_outliers``)."""
    listed, activations = cfg.quantization.per_block_projections, cfg.quantization.activations
    if activations != "int8_per_tensor":
        return [], {"why": f"activations: {activations} (no per-call scale to keep any projection from)"}
    if listed != "auto":
        return list(listed), {"why": "listed in the config"}
    if statistics is None:
        raise ConfigError("per_block_projections: auto needs notebook 02's calibration statistics, which a graph "
                          "quantized here has none of: list the projections", "quantization.per_block_projections")
    outliers = activation_outliers(load_stats(statistics))
    ratios = ", ".join(f"{p} {r:.1f}" for p, r in outliers["max_over_median"].items())
    why = (f"calibration statistics ({statistics}): input max/median channel {ratios}; per block at >= "
           f"{outliers['threshold']:g}")
    return list(outliers["per_block_projections"]), {"why": why, "max_over_median": outliers["max_over_median"],
                                                     "threshold": outliers["threshold"]}


def _plan(cfg: CompileConfig, args: Qwen2Args, keep_fp32=frozenset(), hf_config: dict | None = None,
          per_block: list[str] = ()) -> GraphPlan:
    """The graph plan: the YAML's choices, with what the package's config.json decides (insert_slice ->
    last-position logits, unless graph.insert_slice says otherwise) and the resolved per-block list."""
    per_block = tuple(per_block)
    return cfg.graph_plan(max_position_embeddings=args.max_position_embeddings,
                          insert_slice=bool((hf_config or {}).get("insert_slice", False)),
                          dual_chunk=_dual_chunk(cfg.graph.dual_chunk_attention, args, hf_config),
                          per_block=per_block, keep_fp32=keep_fp32)


def _dual_chunk(switch: bool | None, args: Qwen2Args, hf_config: dict | None) -> tuple[int, int] | None:
    """(chunk_size, local_size) when the graph runs Dual Chunk Attention: the package's config decides unless
    graph.dual_chunk_attention says otherwise; only a deploy package (patch 7) is a DCA reference to verify against."""
    config = args.dual_chunk_attention_config
    if switch is False or (switch is None and not config):
        return None
    if not config:
        raise ConfigError("graph.dual_chunk_attention is true but the package's config.json has no "
                          "dual_chunk_attention_config: set it (qwen2lib generate/bench/eval --dca CHUNK,LOCAL) or "
                          "leave the switch at null", "graph.dual_chunk_attention")
    if hf_config is not None and "auto_map" not in hf_config:
        raise ConfigError("Dual Chunk Attention graphs are verified against the deploy package (patch 7); a raw "
                          "checkpoint's transformers model has none: use source.package: patched, or set "
                          "graph.dual_chunk_attention: false", "graph.dual_chunk_attention")
    try:
        chunk_size, local_size, _ = dca_config_from_dict(config)
    except ValueError as error:
        raise ConfigError(f"the package's {error}", "graph.dual_chunk_attention") from None
    return chunk_size, local_size


def match_plan(reference_model, plan: GraphPlan):
    """The package's model computing what the plan says: Dual Chunk Attention off when the graph has it off."""
    if plan.dual_chunk is None and getattr(reference_model.config, "dual_chunk_attention_config", None):
        reference_model.config.dual_chunk_attention_config = None  # patch 7 reads the config on every forward
    return reference_model


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def compile_model(config: str | os.PathLike | dict | CompileConfig, model: str | None = None, weights: str | None = None,
                  workdir: str | os.PathLike | None = None, *, seed: int = 0, overrides: dict | None = None,
                  out_dir: str | os.PathLike | None = None, verbose: bool = True, force: bool = True) -> Path:
    """Compile per a YAML config (path, shipped name, dict or CompileConfig) into ``<workdir>/compiled/<name>/``;
    returns it.

    The graph is built from notebook 01's deploy package (fp32, fp16) or notebook 03's quantized package
    (int8), each ensured first (``source.package: checkpoint`` builds from the raw checkpoint instead).
    ``model``/``weights`` override the config's ``source``; ``overrides`` maps dotted keys to values
    (``{"graph.opset": 17}``). ``force=False`` reuses a folder built from the same inputs, config and code
    (``ensure_compiled``). Raises ConfigError on a bad config, NumericalOverflowError when fp16 cannot hold
    the model, CompileVerificationError when the graph misses its bounds (nothing is installed then).
    """
    cfg = load_config(config if isinstance(config, (dict, CompileConfig)) else config_path(config), overrides)
    src = cfg.source
    model = model or src.checkpoint or src.model or "tiny"
    weights = weights or src.weights or "auto"
    workdir = Path(workdir) if workdir else default_workdir(model)
    final = Path(out_dir) if out_dir else stage_dir(workdir, "compiled", cfg.name)
    check_replaceable(final)  # before any slow work: never replace a folder qwen2lib did not write
    folder = _source_folder(cfg, model, weights, seed, workdir, verbose)
    int8_folder = _int8_folder(cfg, model, weights, seed, workdir, verbose, folder)  # the package ensured once
    statistics = statistics_folder(cfg, int8_folder) if cfg.quantized else None  # what decides per-block activations
    inputs = {"source": folder, **({"int8_package": int8_folder} if int8_folder else {}),
              **({"calibration": statistics} if statistics else {})}
    request = {"config": cfg.as_dict(), "seed": seed}

    def build(tmp: Path) -> dict:
        return _compile_into(tmp, cfg, folder, int8_folder, statistics, str(model), weights, seed, verbose)

    out = ensure_stage("compiled", final, request, inputs, build, force=force, verbose=verbose)
    if verbose:
        print(f"[compile {cfg.name}] {out}", flush=True)
    return out


def _load_source(cfg: CompileConfig, folder: Path, int8_folder: Path | None, model: str, phases) -> tuple:
    """(Source, int8 weights, their label): the package's config and float weights, and the int8 ones."""
    with phases("source weights", str(folder)):
        hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        source = Source(model, folder, hf_config, Qwen2Args.from_config_dict(hf_config), load_weights(folder))
    with phases("int8 weights", "yes" if cfg.quantized else "not needed"):
        quantized, label = _int8_weights(cfg, int8_folder, source) if cfg.quantized else ({}, None)
    return source, quantized, label


def verify_sample(v, model: str, weights: str, hf_config: dict) -> tuple[int, int, str]:
    """(blocks, tokens per block, text) the fidelity report runs on: the config's sizes, or where it leaves them null
    notebook 03's sample for the model (a trained checkpoint gets 16 x 128 tokens of the text it is for: 256 could
    not rank schemes, nor tell a broken int8 graph from a good one); random weights keep the small one."""
    settings = default_settings(model, weights)
    small = DEFAULT_SETTINGS if hf_config.get("qwen2lib_random_weights") else settings
    return (v.blocks or small["heldout_blocks"], v.block_tokens or small["heldout_len"], settings["heldout_text"])


def traced(cfg: CompileConfig, folder: Path) -> bool:
    """The standard-ops fp32 graph of a deploy package is traced from its model (``qwen2lib.compile.trace``), as the
    guide's compiler does; every other graph is built node by node (``qwen2lib.compile.builder``)."""
    return (cfg.graph.operator_set == "standard" and cfg.precision == "fp32"
            and (folder / "patches.json").is_file())


def _compile_into(tmp: Path, cfg: CompileConfig, folder: Path, int8_folder: Path | None, statistics: Path | None,
                  model: str, weights: str, seed: int, verbose: bool) -> dict:
    """Build, save, check and verify the graph into ``tmp``; returns the metrics (manifest.json written too)."""
    phases = _Phases(cfg.name, verbose)
    with phases("config", cfg.origin or "dict"):
        pass
    source, quantized, quant_label = _load_source(cfg, folder, int8_folder, model, phases)
    v = cfg.verify
    sample = verify_sample(v, model, weights, source.config)
    blocks, text_label = verify_tokens(folder, source.args.vocab_size, sample[0], sample[1], seed, sample[2])
    reference_model, keep, probe = None, frozenset(), None  # at 7B+ weights, graph and reference do not all fit
    with phases("fp16 range probe", "yes" if cfg.precision == "fp16" else "not needed"):
        if cfg.precision == "fp16":
            reference_model = load_reference(folder)
            keep, probe = fp16_plan(activation_ranges(reference_model, blocks), cfg.fp16.headroom,
                                    cfg.fp16.on_overflow)
            if verbose and keep:
                print(f"[compile {cfg.name}]     kept in fp32 (fp16 would overflow): {', '.join(sorted(keep))}")
    per_block, per_block_reason = per_block_projections(cfg, statistics) if cfg.quantized else ([], {"why": None})
    plan = _plan(cfg, source.args, keep, source.config, per_block)
    external = {"auto": None, "always": True, "never": False}[cfg.graph.external_data]
    if traced(cfg, folder):
        with phases("graph build", "torch.onnx.export of the deploy package's model (standard ops, fp32)"):
            reference_model = match_plan(load_reference(folder), plan)
            reference_model.config.insert_slice = plan.insert_slice  # the graph computes what the plan says
            files = export_package_graph(reference_model, tmp, opset=cfg.graph.opset, external=external,
                                         max_positions=plan.max_sequence_length)
            reference_model.config.insert_slice = False  # as a reference it scores every position
            histogram, precision = op_histogram(tmp / "model.onnx"), weight_precision(source.args, plan)
    else:
        with phases("graph build", f"{plan.operator_set} ops, {cfg.precision}, weights written one by one"):
            built = build_graph(source.args, source.weights, plan, quantized, out_dir=tmp)
            files = built.save(tmp, external)
            histogram, precision = op_histogram(built), built.precision
            del built
    with phases("save + onnx.checker"):
        onnx.checker.check_model(str(tmp / "model.onnx"))
        for name in ("config.json",) + TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
    fits, skipped = (verification_fits(source.config, cfg.precision) if cfg.precision in QUANTIZED
                     else (True, ""))
    with phases("verify vs torch", f"{v.prompt_tokens}-token prompt + {v.decode_steps} decode steps, "
                                   f"{sample[0]}x{sample[1]} tokens of {text_label}" if fits else skipped):
        if not fits:  # past this machine's memory: built, and verified where it can be loaded
            parity, fid = {"skipped": skipped}, {"skipped": skipped}
        else:
            if reference_model is None and source.config.get("dual_chunk_attention_config"):
                # patch 7's attention takes its chunk positions from the model's forward, which the layer-by-layer
                # reference skips; and with DCA switched off for the graph, match_plan turns it off in the reference
                reference_model = load_reference(folder)
            reference = (logits_fn(match_plan(reference_model, plan)) if reference_model is not None
                         else streamed_reference(folder, verbose and f"[compile {cfg.name}]    "))
            parity, fid = _verify(tmp, cfg, plan, reference, blocks, source.config)
            del reference_model, reference
    with phases("manifest"):
        manifest = _manifest(tmp, cfg, plan, source, files, histogram, precision, probe, parity, fid, weights, seed,
                             quant_label, text_label, phases.timings)
    return {"name": cfg.name, "model": model, "weights": weights, "seed": seed, "precision": cfg.precision,
            "operator_set": plan.operator_set, "source": str(folder), "int8_package": str(int8_folder or ""),
            "graph_bytes": sum(f["bytes"] for n, f in manifest.files.items() if n.startswith("model.onnx")),
            "insert_slice": plan.insert_slice,
            "per_block_projections": {"projections": list(plan.per_block_projections), **per_block_reason},
            "parity": parity, "fidelity": fid, "kept_in_fp32": sorted(keep)}


def _verify(tmp: Path, cfg: CompileConfig, plan: GraphPlan, reference, blocks: torch.Tensor, hf_config: dict):
    """Parity over a prompt + cached decode steps and the fidelity report against ``reference`` (ids -> fp32
    logits); raises when a bound is missed."""
    v = cfg.verify
    lm = OnnxCausalLM.load(tmp, manifest=GraphManifest(
        operator_set=plan.operator_set, max_sequence_length=plan.max_sequence_length,
        dual_chunk_attention=_dual_chunk_record(plan), insert_slice=plan.insert_slice, config=cfg.as_dict()))
    prompt = blocks.flatten()[: v.prompt_tokens][None]
    parity = decode_parity(reference, lm, prompt, v.decode_steps)
    fid = fidelity(reference, lm, blocks)  # a last-position graph is walked token by token through its cache
    random_weights = bool(hf_config.get("qwen2lib_random_weights"))
    failures = check_bounds(v, parity, fid, random_weights)
    if random_weights:
        fid["note"] = ("random weights: KLD, top-1 agreement and perplexity reported, not bounded (near-flat logits, "
                       "rounding amplified by an untrained model); the parity bound still applies")
    if failures:
        raise CompileVerificationError(f"{cfg.name}: the compiled graph misses its bounds: " + "; ".join(failures)
                                       + " (nothing installed)")
    return parity, fid


def _manifest(tmp, cfg, plan, source, files, histogram, precision, probe, parity, fid, weights, seed,
              quant_label, text_label, timings) -> GraphManifest:
    args, hf_config = source.args, source.config
    manifest = GraphManifest(
        name=cfg.name, config={**cfg.as_dict(), "_source": cfg.origin},
        source={"model": source.model_id, "weights": weights, "seed": seed, "folder": str(source.folder),
                "int8_weights": quant_label, "random_weights": bool(hf_config.get("qwen2lib_random_weights"))},
        model_config={k: hf_config.get(k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                    "num_hidden_layers", "num_attention_heads",
                                                    "num_key_value_heads", "tie_word_embeddings",
                                                    "max_position_embeddings", "rms_norm_eps", "insert_slice")},
        graph={"file": GRAPH_FILE, "external_data": "model.onnx.data" if len(files) > 1 else None,
               "opset": cfg.graph.opset, "opset_imports": {(o.domain or "ai.onnx"): o.version for o in _opsets(tmp)},
               "nodes": sum(histogram.values())},
        operator_set=plan.operator_set, max_sequence_length=plan.max_sequence_length,
        insert_slice=plan.insert_slice, dual_chunk_attention=_dual_chunk_record(plan),
        rope_scaling=args.rope_scaling,
        kv_cache={"layout": "BNSH", "shape": ["batch", args.num_key_value_heads, "sequence", args.head_dim],
                  "dtype": plan.kv_dtype, "num_layers": args.num_hidden_layers},
        **io_signature(tmp / "model.onnx"),
        precision=precision, op_histogram=dict(histogram.most_common()), fp16_probe=probe,
        verify_text=text_label, parity=parity, fidelity=fid, limits=_limits(plan),
        timings_s=timings, versions=_versions(),
        files={p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
               for p in sorted(tmp.iterdir()) if p.is_file() and p.name != "metrics.json"})
    manifest.write(tmp)
    return manifest


def _dual_chunk_record(plan: GraphPlan) -> dict | None:
    if plan.dual_chunk is None:
        return None
    return {"chunk_size": plan.dual_chunk[0], "local_size": plan.dual_chunk[1]}


def _opsets(folder: Path):
    return onnx.load(str(folder / "model.onnx"), load_external_data=False).opset_import


def _limits(plan: GraphPlan) -> list[str]:
    out = ["attention_mask: 1 for real tokens, 0 for left padding only (right padding is not supported)",
           f"positions < {plan.max_sequence_length} (graph.max_sequence_length)",
           "logits are float32; present.* have the past_key_values.* dtype"]
    if plan.operator_set == "contrib":
        out.append("GroupQueryAttention: continuing a prompt (T > 1) over a non-empty past needs batch 1 "
                   "(OnnxCausalLM.run splits such calls by row)")
    if plan.insert_slice:
        out.append("logits are for the last position only (B, 1, V)")
    if plan.dual_chunk:
        out.append(f"Dual Chunk Attention (chunk_size {plan.dual_chunk[0]}, local_size {plan.dual_chunk[1]}): keys "
                   "are cached rotated at p mod (chunk_size - local_size); attention from standard ops, KV cache "
                   "concatenated each call")
    return out


def _versions() -> dict:
    return {"qwen2lib": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__}


def ensure_compiled(model: str = "tiny", weights: str = "auto", workdir: str | os.PathLike | None = None, *,
                    config: str | os.PathLike | dict | CompileConfig = "qwen2_fp32", seed: int = 0,
                    overrides: dict | None = None, verbose: bool = True) -> Path:
    """``<workdir>/compiled/<config name>/``, reused when built from the same packages, config and code,
    else compiled (``qwen2lib.stages.reuse`` says why)."""
    return compile_model(config, model, weights, workdir, seed=seed, overrides=overrides, verbose=verbose,
                         force=False)
