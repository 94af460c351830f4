"""Compile configs: YAML files checked against a schema, with errors that name the key and the line.

    cfg = load_config("configs/qwen2_int8.yaml")      # nested dict, every default filled in
    cfg["graph"]["opset"], cfg["name"]

A config may extend another with ``base: other.yaml`` (relative to itself); its keys override the
base's, section by section. Dicts (from a notebook) go through the same checks, without lines.
``describe_schema()`` lists every key with its type, default and meaning.
"""
from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .artifacts import check_component
from .errors import Qwen2LibError

PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # a layer's Linears as graphs run them (q|k|v, gate|up fused)


class ConfigError(Qwen2LibError, ValueError):
    """A compile config that does not validate; ``key`` and ``line`` say where."""

    def __init__(self, message: str, key: str | None = None, line: int | None = None, path: str | None = None):
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(f"{where}{key + ': ' if key else ''}{message}")
        self.key, self.line, self.path = key, line, path


@dataclass(frozen=True)
class Field:
    types: tuple  # accepted Python types after YAML parsing
    default: Any
    doc: str
    choices: tuple | None = None
    file: bool = False  # a path that must exist (relative to the YAML file)


def _f(types, default, doc, choices=None, file=False) -> Field:
    return Field(types if isinstance(types, tuple) else (types,), default, doc, choices, file)


NONE = type(None)
MAX_SEQUENCE_LENGTH = 1 << 20  # past Qwen2.5-1M's 1,010,000 positions; a larger table is a typo (GBs of rotary rows)
SCHEMA: dict[str, Any] = {
    "name": _f((str, NONE), None, "output folder under <workdir>/compiled/ (default: the YAML file's name)"),
    "base": _f((str, NONE), None, "another config this one extends, relative to this file", file=True),
    "source": {
        "model": _f((str, NONE), None, "registry name, hub id or checkpoint folder; null: the caller's --model"),
        "weights": _f((str, NONE), None, "auto | random; null: the caller's --weights", choices=("auto", "random", None)),
        "checkpoint": _f((str, NONE), None, "a checkpoint folder to compile (overrides model)", file=True),
        "package": _f(str, "patched", "patched: notebook 01's deploy package (int8: notebook 03's quantized "
                      "package of it) | checkpoint: the raw checkpoint (int8 rounded here by qwen2lib.deploy.quantizer)",
                      choices=("patched", "checkpoint")),
    },
    "precision": _f(str, "fp32", "fp32 | fp16 | int8 | int4 (notebook 03's int4 package; the groups it leaves in "
                    "float, e.g. the head, int8): how the graph stores its weights and computes",
                    choices=("fp32", "fp16", "int8", "int4")),
    "quantization": {
        "scheme": _f(str, "w8_symmetric", "int8 weights, symmetric (zero point 0)", choices=("w8_symmetric",)),
        "granularity": _f(str, "per_channel", "per_channel (one scale per output channel, as notebook 03) | per_block",
                          choices=("per_channel", "per_block")),
        "block_size": _f(int, 128, "MatMulNBits block along the input features (power of two >= 16)"),
        "activations": _f(str, "int8_per_block", "int8_per_block: each row's activations quantized per block "
                          "at run time (MatMulNBits) | int8_per_tensor: one scale per call (DynamicQuantizeMatMul: "
                          "fastest for batches and prefill, less exact; the LM head stays MatMulNBits) | float: fp32 "
                          "compute (slow)",
                          choices=("int8_per_block", "int8_per_tensor", "float")),
        "per_block_projections": _f((list, str), [], "with int8_per_tensor: projections whose activations stay "
                                    "quantized per block (MatMulNBits), for inputs with outlier channels: qkv_proj, "
                                    "o_proj, gate_up_proj, down_proj; auto: those whose calibration statistics "
                                    "(notebook 02, recorded by notebook 03's package) show outlier channels"),
        "modules": _f(list, ["embed_tokens", "attention", "mlp", "lm_head"],
                      "weight groups stored as int8: embed_tokens, attention, mlp, lm_head"),
        "from_scheme": _f(str, "w8a16", "which of notebook 03's quantized packages (<workdir>/quantized/<scheme>, "
                          "built if missing) the weights and scales come from: w8a16 | smoothquant (int8), w4a16 | "
                          "awq (int4)", choices=("w8a16", "smoothquant", "w4a16", "awq")),
        "package": _f((str, NONE), None, "a quantized package folder to take int8 weights and scales from", file=True),
    },
    "graph": {
        "operator_set": _f(str, "contrib", "standard: plain ONNX ops | contrib: onnxruntime fused kernels "
                           "(GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization, MatMulNBits)",
                           choices=("standard", "contrib")),
        "opset": _f(int, 21, "ONNX opset of the default domain (17-23)"),
        "max_sequence_length": _f(int, 4096, "largest position + 1 the graph accepts (rotary tables); "
                                  "0: the model's max_position_embeddings"),
        "dynamic_axes": {
            "batch": _f((str, int), "dynamic", "'dynamic' or a fixed size"),
            "sequence": _f((str, int), "dynamic", "'dynamic' or a fixed size (new tokens per call)"),
            "past_sequence": _f((str, int), "dynamic", "'dynamic' or a fixed size (cached tokens)"),
        },
        "kv_cache_layout": _f(str, "BNSH", "(B, n_kv, T, hd), the layout GroupQueryAttention uses", choices=("BNSH",)),
        "last_position_logits": _f((bool, NONE), None, "logits of the last position only (insert_slice): faster "
                                   "prefill, but no perplexity/scoring over every position; null: as the "
                                   "package's config.json says (insert_slice)"),
        "dual_chunk_attention": _f((bool, NONE), None, "Dual Chunk Attention in the graph: null: as the package's "
                                   "config.json says (dual_chunk_attention_config) | false: plain attention (contexts "
                                   "up to what the model was trained on) | true: required (an error without the config)"),
        "external_data": _f(str, "auto", "auto: weights in model.onnx.data when over 256 MB | always | never",
                            choices=("auto", "always", "never")),
    },
    "fp16": {
        "on_overflow": _f(str, "keep_fp32", "keep_fp32: parts whose activations pass the fp16 range run in "
                          "fp32 | error: stop with NumericalOverflowError", choices=("keep_fp32", "error")),
        "headroom": _f(float, 4.0, "a part is kept in fp32 when its largest activation on the probe text "
                       "exceeds 65504 / headroom"),
    },
    "runtime": {
        "optimization_level": _f(str, "all", "onnxruntime graph optimisation: disable | basic | extended | all",
                                 choices=("disable", "basic", "extended", "all")),
        "threads": _f(int, 0, "intra-op threads (0: onnxruntime's default)"),
    },
    "verify": {
        "prompt_tokens": _f(int, 24, "parity prompt length"),
        "decode_steps": _f(int, 16, "cached decode steps compared after the prompt"),
        "blocks": _f(int, 4, "held-out text blocks for the fidelity report"),
        "block_tokens": _f(int, 64, "tokens per block"),
        "max_abs_dlogits": _f((float, NONE), 1.0e-4, "parity bound vs the torch fp32 reference (null: report only)"),
        "max_kld_mean": _f((float, NONE), None, "fidelity bound: mean KL(ref || graph) per token"),
        "min_top1_agreement": _f((float, NONE), None, "fidelity bound: share of positions with the same argmax"),
        "max_ppl_ratio": _f((float, NONE), None, "fidelity bound: perplexity(graph) / perplexity(ref)"),
    },
}


def describe_schema(schema: dict | None = None, prefix: str = "") -> list[dict]:
    """Every key: dotted name, types, default, choices and meaning (the notebook prints this table)."""
    rows = []
    for key, spec in (schema or SCHEMA).items():
        if isinstance(spec, dict):
            rows += describe_schema(spec, f"{prefix}{key}.")
        else:
            rows.append({"key": prefix + key, "type": " | ".join("null" if t is NONE else t.__name__ for t in spec.types),
                         "default": spec.default, "choices": spec.choices, "meaning": spec.doc})
    return rows


def defaults(schema: dict | None = None) -> dict:
    return {k: defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in (schema or SCHEMA).items()}


# ---- loading with line numbers ----------------------------------------------------------------

def _key_lines(node: yaml.Node, path: str) -> dict[str, int]:
    """{dotted key: 1-based line} from the composed YAML tree's start marks; duplicate keys refused."""
    lines: dict[str, int] = {}

    def walk(n, dotted):
        if isinstance(n, yaml.MappingNode):
            seen = set()
            for k_node, v_node in n.value:
                full = f"{dotted}.{k_node.value}" if dotted else str(k_node.value)
                if full in seen:
                    raise ConfigError("appears twice in the same section", full, k_node.start_mark.line + 1, path)
                seen.add(full)
                lines[full] = k_node.start_mark.line + 1
                walk(v_node, full)

    walk(node, "")
    return lines


def _read_yaml(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise FileNotFoundError(f"compile config {path} does not exist: pass one of the YAML files in configs/ "
                                "(qwen2_fp32.yaml, qwen2_fp16.yaml, qwen2_int8.yaml) or your own")
    loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError("the top level must be a mapping of sections (source:, precision:, graph:, ...)",
                              None, node.start_mark.line + 1, str(path))
        lines = _key_lines(node, str(path))
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"not valid YAML: {getattr(exc, 'problem', None) or exc}", None,
                          mark.line + 1 if mark else None, str(path)) from exc
    finally:
        loader.dispose()
    return data, lines


def _check(data: dict, schema: dict, lines: dict, path: str | None, base_dir: Path | None, prefix: str = "") -> None:
    """Unknown keys, wrong types, bad choices and missing files, each named with its line."""
    for key, value in data.items():
        key = str(key)
        full = prefix + key
        line = lines.get(full)
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"section {prefix[:-1]!r}" if prefix else "the top level"
            raise ConfigError(f"unknown key{hint}; {where} allows {', '.join(schema)}", full, line, path)
        spec = schema[key]
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"must be a section with keys {', '.join(spec)}, got {_type_name(value)}",
                                  full, line, path)
            _check(value, spec, lines, path, base_dir, full + ".")
            continue
        if not _type_ok(value, spec.types):
            expected = " or ".join("null" if t is NONE else t.__name__ for t in spec.types)
            hint = ""
            if float in spec.types and isinstance(value, str):
                try:
                    float(value)
                    hint = " (YAML reads 1e-4 as text: write 1.0e-4)"
                except ValueError:
                    pass
            raise ConfigError(f"expected {expected}, got {_type_name(value)} {value!r}{hint}", full, line, path)
        if spec.choices is not None and value not in spec.choices:
            shown = ", ".join("null" if c is None else str(c) for c in spec.choices)
            raise ConfigError(f"{value!r} is not one of {shown}", full, line, path)
        if spec.file and value is not None:
            target = Path(os.path.expanduser(value))
            if not target.is_absolute() and base_dir is not None:
                target = base_dir / target
            if not target.exists():
                raise ConfigError(f"{value!r} does not exist (resolved to {target})", full, line, path)


def _type_ok(value, types) -> bool:
    if isinstance(value, bool):  # YAML true/false must not pass as an int or float
        return bool in types
    if isinstance(value, int) and float in types and int not in types:
        return True  # 1 is a fine float
    return isinstance(value, tuple(t for t in types))


def _type_name(value) -> str:
    return "null" if value is None else ("a mapping" if isinstance(value, dict) else type(value).__name__)


def _absolutize(data: dict, schema: dict, base_dir: Path) -> None:
    """File keys are written relative to their YAML file; store them absolute so a config means the same
    thing whatever the working directory."""
    for key, value in data.items():
        spec = schema.get(key)
        if isinstance(spec, dict) and isinstance(value, dict):
            _absolutize(value, spec, base_dir)
        elif isinstance(spec, Field) and spec.file and isinstance(value, str) and key != "base":
            data[key] = str((base_dir / Path(value).expanduser()).resolve())


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _load_file(path: Path, seen: tuple = ()) -> tuple[dict, dict[str, tuple[str, int]]]:
    """One file (and its bases), validated; returns the merged data and {key: (file, line)}."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"'base' chain loops back to {path}", "base", None, str(seen[-1]))
    data, lines = _read_yaml(path)
    _check(data, SCHEMA, lines, str(path), path.parent)
    _absolutize(data, SCHEMA, path.parent)
    where = {k: (str(path), line) for k, line in lines.items()}
    if data.get("base"):
        base_data, base_where = _load_file(path.parent / data["base"], seen + (path,))
        data = _merge(base_data, {k: v for k, v in data.items() if k != "base"})
        where = {**base_where, **where}
    return data, where


def _check_semantics(cfg: dict, where: dict) -> None:
    """Rules between keys, reported at the line of the key that breaks them."""

    def fail(key, message):
        path, line = where.get(key, (None, None))
        raise ConfigError(message, key, line, path)

    g, q = cfg["graph"], cfg["quantization"]
    if cfg["precision"] in ("int8", "int4") and g["operator_set"] != "contrib":
        fail("graph.operator_set", f"precision {cfg['precision']} needs operator_set 'contrib' (quantized weights run "
                                   "in onnxruntime's MatMulNBits); use contrib or precision fp32/fp16")
    int4_scheme = q["from_scheme"] in ("w4a16", "awq")
    if cfg["precision"] in ("int8", "int4") and not q["package"] and int4_scheme != (cfg["precision"] == "int4"):
        fail("quantization.from_scheme", f"{q['from_scheme']} is {'an int4' if int4_scheme else 'an int8'} package: "
                                         f"precision {cfg['precision']} takes "
                                         f"{'w4a16 or awq' if cfg['precision'] == 'int4' else 'w8a16 or smoothquant'}")
    if not 17 <= g["opset"] <= 23:
        fail("graph.opset", f"{g['opset']} is outside the supported 17-23 (onnxruntime 1.32 and the ops used)")
    traced = g["operator_set"] == "standard" and cfg["precision"] == "fp32" and cfg["source"]["package"] == "patched"
    if traced and g["opset"] < 18:
        fail("graph.opset", f"{g['opset']}: the standard-ops graph of a deploy package is traced by torch.onnx.export, "
                            "which emits opset 18 or later")
    if not 0 <= g["max_sequence_length"] <= MAX_SEQUENCE_LENGTH:
        fail("graph.max_sequence_length", f"{g['max_sequence_length']}: must be 1..{MAX_SEQUENCE_LENGTH:,} (the rotary "
                                          "tables grow with it), or 0 for the model's max_position_embeddings")
    for axis, value in g["dynamic_axes"].items():
        if not (value == "dynamic" or (isinstance(value, int) and value >= (0 if axis == "past_sequence" else 1))):
            fail(f"graph.dynamic_axes.{axis}", f"{value!r}: use 'dynamic' or a positive size")
    if q["activations"] == "int8_per_tensor" and q["granularity"] != "per_channel":
        fail("quantization.activations", f"{q['activations']} (DynamicQuantizeMatMul) takes per-channel weight "
                                         "scales only; use granularity: per_channel")
    listed = q["per_block_projections"]
    if isinstance(listed, str) and listed != "auto":
        fail("quantization.per_block_projections", f"{listed!r}: use 'auto' or a list of {', '.join(PROJECTIONS)}")
    if listed == "auto" and cfg["source"]["package"] == "checkpoint" and not q["package"]:
        fail("quantization.per_block_projections", "auto reads the calibration statistics of notebook 03's package: "
                                                   "use source.package: patched, or list the projections")
    bad = [] if listed == "auto" else [m for m in listed if m not in PROJECTIONS]
    if bad or (listed != "auto" and len(set(listed)) != len(listed)):
        fail("quantization.per_block_projections", f"{q['per_block_projections']}: list each of "
                                                   f"{', '.join(PROJECTIONS)} at most once")
    if q["per_block_projections"] and q["activations"] != "int8_per_tensor":
        fail("quantization.per_block_projections", f"applies with activations: int8_per_tensor only "
                                                   f"(activations here: {q['activations']})")
    bs = q["block_size"]
    if bs < 16 or bs & (bs - 1):
        fail("quantization.block_size", f"{bs}: MatMulNBits needs a power of two >= 16 (16, 32, 64, 128, 256)")
    bad = [m for m in q["modules"] if m not in ("embed_tokens", "attention", "mlp", "lm_head")]
    if bad or len(set(q["modules"])) != len(q["modules"]):
        fail("quantization.modules", f"{q['modules']}: list each of embed_tokens, attention, mlp, lm_head at most once")
    if cfg["fp16"]["headroom"] < 1:
        fail("fp16.headroom", "must be >= 1 (1 keeps fp16 up to its full range of 65504)")
    for key in ("prompt_tokens", "decode_steps", "blocks", "block_tokens"):
        if cfg["verify"][key] < (0 if key == "decode_steps" else 1):
            fail(f"verify.{key}", "must be a positive count")
    if cfg["runtime"]["threads"] < 0:
        fail("runtime.threads", "must be >= 0")


def set_dotted(data: dict, dotted: str, value) -> dict:
    """``set_dotted(cfg, "graph.opset", 17)``: the override form the CLI's --set uses."""
    node = data
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {key} is not a section", dotted)
    node[last] = value
    return data


def load_config(source: str | os.PathLike | dict, overrides: dict | None = None) -> dict:
    """Validated config with defaults filled; ``overrides`` maps dotted keys to values.

    ``cfg["name"]`` is the output folder name; ``cfg["_source"]`` the file it came from (or None).
    """
    if isinstance(source, dict):
        data = copy.deepcopy(source)
        data.pop("_source", None)
        path, where = None, {}
        _check(data, SCHEMA, {}, None, Path.cwd())
        if data.get("base"):
            base, where = _load_file(Path(data["base"]))
            data = _merge(base, {k: v for k, v in data.items() if k != "base"})
    else:
        path = Path(source)
        data, where = _load_file(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
        where[dotted] = ("--set", None)
    _check(data, SCHEMA, {}, "overrides" if overrides else None, Path.cwd())
    cfg = _merge(defaults(), data)
    cfg.pop("base", None)
    _check_semantics(cfg, where)
    if not cfg["name"]:
        cfg["name"] = path.stem if path is not None else f"qwen2_{cfg['precision']}"
    try:  # the name becomes <workdir>/compiled/<name>: one folder name, never a path
        check_component(cfg["name"], "name")
    except ValueError as exc:
        file, line = where.get("name", (str(path) if path else None, None))
        raise ConfigError(str(exc), "name", line, file) from None
    cfg["_source"] = str(path.resolve()) if path is not None else None
    return cfg
