"""The stage subcommands, in workbook order: ``patch`` (01), ``calibrate`` (02), ``quantize`` (03), ``compile`` (04),
``export``. Each reads its arguments, checks what it can before anything slow runs, calls the stage and prints it."""
from __future__ import annotations

import json
import sys

import torch
import yaml

from ..artifacts import read_metrics, stage_dir
from ..calibrate.stage import DEFAULT_PERCENTILE, DEFAULT_REQUEST, ensure_calibration
from ..compile.manifest import GraphManifest
from ..compile.stage import compile_model, config_path
from ..compile.config_schema import ConfigError
from ..calibrate.data import DATASETS
from ..deploy import build_deploy_package, prove_package
from ..deploy.quantizer import DEFAULT_GROUP_SIZE
from ..deploy.schemes import DEFAULT_SKIP, INT8_SCHEMES, SCHEMES, check_settings
from ..export.stage import FORMATS, check_export_request, ensure_exported
from ..export.gguf import GGUF_TYPES, ExportError
from ..evaluation.fidelity import fidelity_table
from ..model.loading import checkpoint_dir
from ..quantize.stage import ensure_quantized, size_table
from .common import add_model_args, workdir_of


# ---- deploy (patch) -------------------------------------------------------------------------------


def cmd_patch(args) -> int:
    checkpoint = checkpoint_dir(args.model, args.weights, args.seed)
    package = build_deploy_package(checkpoint, stage_dir(workdir_of(args), "patched"),
                                   target=args.target, insert_slice=args.insert_slice)
    print(f"[patch] wrote {package}", file=sys.stderr)
    if not args.no_proof:
        prompt = torch.randint(json.loads((package / "config.json").read_text())["vocab_size"], (1, 32),
                               generator=torch.Generator().manual_seed(args.seed))
        proof = prove_package(package, checkpoint, prompt, dtype=args.dtype)
        print(json.dumps(proof, indent=2))
        if not proof["passed"]:
            return 1
    return 0


def register_patch(sub) -> None:
    p = sub.add_parser("patch", help="deploy package (patched transformers Qwen2 source) -> <workdir>/patched/")
    add_model_args(p)
    p.add_argument("--target", default="onnx", help="suffix of the patched files (default: onnx)")
    p.add_argument("--insert-slice", action="store_true", help="slice to the last position before lm_head")
    p.add_argument("--no-proof", action="store_true", help="skip the logits comparison with upstream")
    p.set_defaults(func=cmd_patch)


# ---- calibration ---------------------------------------------------------------------------------


def cmd_calibrate(args) -> int:
    out = ensure_calibration(args.model, args.weights, workdir_of(args), dataset=args.dataset,
                             data_path=args.data_path, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                             percentile=args.percentile, fallback=not args.no_fallback, force=args.force)
    metrics = read_metrics(out)
    print(f"{metrics['linears']} Linears, {metrics['tokens']} tokens of {metrics['dataset']}")
    worst = sorted(metrics["outliers"].items(), key=lambda kv: -kv[1]["max_over_median"])[:5]
    for name, o in worst:
        print(f"  {name}: max {o['max']:.3g} at channel {o['argmax_channel']} = {o['max_over_median']:.1f} x median")
    print(out)
    return 0


def add_calibration_set_args(p, purpose: str = "") -> None:
    """--dataset/--data-path/--samples/--seq-len, shared by `calibrate` and `quantize`. Unset: the existing
    calibration's setting (notebook 02's), else the default."""
    d = DEFAULT_REQUEST
    p.add_argument("--dataset", default=None, choices=DATASETS,
                   help=f"{purpose}calibration set (default: the existing calibration's, else {d['dataset']})")
    p.add_argument("--data-path", default=None, help=f"{purpose}local file/folder in the set's published layout")
    p.add_argument("--samples", type=int, default=None,
                   help=f"{purpose}calibration samples (default {d['samples']}; peers: 128)")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"{purpose}tokens per sample (default {d['seq_len']}; peers: 512)")


def register_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="per-channel activation statistics of every Linear on a calibration set")
    add_model_args(p)
    add_calibration_set_args(p)
    p.add_argument("--percentile", type=float, default=None, help=f"default {DEFAULT_PERCENTILE}")
    p.add_argument("--no-fallback", action="store_true", help="fail instead of using builtin when the set is unavailable")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_calibrate)

# ---- quantization --------------------------------------------------------------------------------


def cmd_quantize(args) -> int:
    check_settings(args.scheme, 0.5 if args.alpha is None else args.alpha,
                   args.group_size or DEFAULT_GROUP_SIZE)  # before any stage is built
    calibration = {k: v for k, v in (("dataset", args.dataset), ("data_path", args.data_path),
                                     ("samples", args.samples), ("seq_len", args.seq_len)) if v is not None}
    out = ensure_quantized(args.model, args.weights, workdir_of(args), scheme=args.scheme, alpha=args.alpha,
                           seed=args.seed, skip=args.skip, heldout_blocks=args.heldout_blocks,
                           heldout_len=args.heldout_len, group_size=args.group_size, calibration=calibration,
                           force=args.force)
    metrics = read_metrics(out)
    print(fidelity_table({args.scheme: metrics["fidelity"]}).T.to_string())
    print(size_table(metrics["sizes"]).to_string())
    print(out)
    return 0


def register_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="int8 weights (w8a16), SmoothQuant W8A8 or int4 (w4a16, awq, gptq) for the "
                       "deploy package, with a fidelity report")
    add_model_args(p)
    p.add_argument("--scheme", default="w8a16", choices=SCHEMES)
    p.add_argument("--alpha", type=float, default=None, help="SmoothQuant migration strength in [0, 1] (default "
                   "0.5; unset settings keep the existing package's)")
    p.add_argument("--group-size", type=int, default=None, help=f"int4 schemes: inputs per scale and zero point "
                   f"(default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--skip", nargs="*", default=None, help=f"Linear names/patterns kept in float (default {DEFAULT_SKIP})")
    add_calibration_set_args(p)
    p.add_argument("--heldout-blocks", type=int, default=None, help="held-out blocks for the fidelity report (4)")
    p.add_argument("--heldout-len", type=int, default=None, help="tokens per held-out block (64)")
    p.add_argument("--force", action="store_true", help="rebuild even when a matching package exists")
    p.set_defaults(func=cmd_quantize)

# ---- compile -------------------------------------------------------------------------------------


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. graph.insert_slice=true")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_compile(args) -> int:
    path = compile_model(config_path(args.config), args.model, args.weights, args.workdir, seed=args.seed,
                         overrides=_parse_set(args.set))
    manifest = GraphManifest.read(path)
    parity = {k: v for k, v in manifest.parity.items() if k != "per_position"}
    print(json.dumps({"folder": str(path), "precision": manifest.precision, "parity": parity,
                      "fidelity": manifest.fidelity}, indent=2, default=str))
    return 0


def register_compile(sub) -> None:
    p = sub.add_parser("compile", help="compile a checkpoint to an ONNX graph per a YAML config (notebook 04)",
                       description="Compile to <workdir>/compiled/<config name>/: graph, tokenizer, manifest.json. "
                                   "The precision comes from the YAML; --dtype is not used.")
    p.add_argument("config", help="YAML config: a path or a shipped name (qwen2_fp32, qwen2_fp16, qwen2_int8)")
    add_model_args(p)
    p.set_defaults(model=None, weights=None, func=cmd_compile)  # None: the YAML's source decides
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set graph.insert_slice=true (repeatable)")

# ---- export --------------------------------------------------------------------------------------


def cmd_export(args) -> int:
    variant = args.type if args.format == "gguf" else args.scheme
    if args.format == "gguf" and args.scheme:
        raise ExportError("--scheme picks the int8 package of --format compressed-tensors; a GGUF takes --type")
    if args.format == "compressed-tensors" and args.type:
        raise ExportError("--type picks a GGUF quantization; --format compressed-tensors takes --scheme")
    check_export_request(args.format, variant, args.float_dtype, args.verify_blocks, args.verify_len)
    out = ensure_exported(args.model, args.weights, workdir_of(args), format=args.format, variant=variant,
                          float_dtype=args.float_dtype, verify_blocks=args.verify_blocks,
                          verify_len=args.verify_len, seed=args.seed, force=args.force)
    metrics = read_metrics(out)
    if metrics.get("fidelity"):
        print(fidelity_table(metrics["fidelity"]).to_string())
    for engine, line in metrics["serve"].items():
        print(f"{engine}: {line}", file=sys.stderr)
    print(out)
    return 0


def register_export(sub) -> None:
    p = sub.add_parser("export", help="hand the model to other engines: GGUF (llama.cpp, ollama) or "
                       "compressed-tensors (vLLM, SGLang), each read back and compared")
    add_model_args(p)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--type", default=None, help=f"GGUF: {' | '.join(GGUF_TYPES)} (default q8_0)")
    p.add_argument("--scheme", default=None, help=f"compressed-tensors: the int8 package, {' | '.join(INT8_SCHEMES)} "
                   "(default w8a16)")
    p.add_argument("--float-dtype", default="bfloat16", help="compressed-tensors: dtype of the unquantized tensors "
                   "and of serving (bfloat16; vLLM's int8 kernels take 16-bit activations)")
    p.add_argument("--verify-blocks", type=int, default=2, help="held-out blocks for the read-back check (0 skips)")
    p.add_argument("--verify-len", type=int, default=64, help="tokens per held-out block")
    p.add_argument("--force", action="store_true", help="rebuild even when a matching export exists")
    p.set_defaults(func=cmd_export)

