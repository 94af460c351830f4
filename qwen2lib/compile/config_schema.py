"""Compile configs: each YAML section a typed dataclass, loaded with errors that name the file, the line and the key.

    cfg = load_config("configs/qwen2_int8.yaml")      # a CompileConfig, every default filled in
    cfg.graph.opset, cfg.quantization.block_size, cfg.name
    cfg.as_dict()                                     # the nested dict the stage key and manifest.json record

The dataclasses are the schema: a field's type is what the YAML may hold (a list for a tuple), its default the
default, and its metadata (``setting``) the meaning and choices that ``describe_schema()`` prints. A config may
extend another with ``base: other.yaml`` (relative to itself); its keys override the base's, section by section.
Dicts (from a notebook) go through the same checks, without lines. Rules within a section live in its
``__post_init__``; rules between graph keys live in ``GraphPlan`` (``qwen2lib.compile.plan``), which the config
builds once on load (``CompileConfig.graph_plan``) so that its error is reported at the key's line.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..artifacts import check_component
from ..deploy.schemes import INT4_SCHEMES, INT8_SCHEMES, SCHEMES
from ..errors import MissingInputError, Qwen2LibError
from .plan import (ACTIVATION_SCHEMES, GRANULARITIES, OPERATOR_SETS, PRECISION_DTYPE, PROJECTIONS, QUANTIZABLE_GROUPS,
                   QUANTIZED, GraphPlan, PlanError)

NONE = type(None)
MAX_SEQUENCE_LENGTH = 1 << 20  # past Qwen2.5-1M's 1,010,000 positions; a larger table is a typo (GBs of rotary rows)


class ConfigError(Qwen2LibError, ValueError):
    """A compile config that does not validate; ``key`` and ``line`` say where."""

    def __init__(self, message: str, key: str | None = None, line: int | None = None, path: str | None = None):
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(f"{where}{key + ': ' if key else ''}{message}")
        self.message, self.key, self.line, self.path = message, key, line, path

    def located(self, where: dict[str, tuple[str, int | None]], fallback=(None, None)) -> ConfigError:
        """The same error at the file and line its key came from (``where``: {dotted key: (file, line)})."""
        path, line = where.get(self.key, fallback)
        return ConfigError(self.message, self.key, line, path)


def setting(default, doc: str, choices: tuple | None = None, file: bool = False):
    """A config key: its default, meaning, allowed values and whether it names a path that must exist (relative
    to its YAML file)."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "file": file})


def section(cls):
    return field(default_factory=cls, metadata={"section": True})


# ---- the sections ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceConfig:
    model: str | None = setting(None, "registry name, hub id or checkpoint folder; null: the caller's --model")
    weights: str | None = setting(None, "auto | random; null: the caller's --weights", ("auto", "random", None))
    checkpoint: str | None = setting(None, "a checkpoint folder to compile (overrides model)", file=True)
    package: str = setting("patched", "patched: notebook 01's deploy package (int8: notebook 03's quantized package "
                           "of it) | checkpoint: the raw checkpoint (int8 rounded here by qwen2lib.deploy.quantizer)",
                           ("patched", "checkpoint"))


@dataclass(frozen=True)
class QuantizationConfig:
    scheme: str = setting("w8_symmetric", "int8 weights, symmetric (zero point 0)", ("w8_symmetric",))
    granularity: str = setting("per_channel", "per_channel (one scale per output channel, as notebook 03) | "
                               "per_block", GRANULARITIES)
    block_size: int = setting(128, "MatMulNBits block along the input features (power of two >= 16)")
    activations: str = setting("int8_per_block", "int8_per_block: each row's activations quantized per block at run "
                               "time (MatMulNBits) | int8_per_tensor: one scale per call (DynamicQuantizeMatMul: "
                               "fastest for batches and prefill, less exact; the LM head stays MatMulNBits) | float: "
                               "fp32 compute (slow)", ACTIVATION_SCHEMES)
    per_block_projections: tuple[str, ...] | str = setting(
        (), "with int8_per_tensor: projections whose activations stay quantized per block (MatMulNBits), for inputs "
        "with outlier channels: qkv_proj, o_proj, gate_up_proj, down_proj; auto: those whose calibration statistics "
        "(notebook 02's, those the package was quantized from) show outlier channels")
    modules: tuple[str, ...] = setting(QUANTIZABLE_GROUPS, "weight groups stored as int8: embed_tokens, attention, "
                                       "mlp, lm_head")
    from_scheme: str | None = setting("w8a16", "which of notebook 03's quantized packages (<workdir>/quantized/"
                                      "<scheme>, built if missing) the weights and scales come from: w8a16 | "
                                      "smoothquant (int8), w4a16 | awq | gptq (int4); null: int8 rounded here from the "
                                      "deploy package's fp32 weights at this section's granularity",
                                      SCHEMES + (None,))
    package: str | None = setting(None, "a quantized package folder to take int8 weights and scales from", file=True)

    def __post_init__(self):
        listed = self.per_block_projections
        if isinstance(listed, str) and listed != "auto":
            raise ConfigError(f"{listed!r}: use 'auto' or a list of {', '.join(PROJECTIONS)}",
                              "quantization.per_block_projections")

    @property
    def int4_scheme(self) -> bool:
        return self.from_scheme in INT4_SCHEMES


@dataclass(frozen=True)
class DynamicAxesConfig:
    batch: str | int = setting("dynamic", "'dynamic' or a fixed size")
    sequence: str | int = setting("dynamic", "'dynamic' or a fixed size (new tokens per call)")
    past_sequence: str | int = setting("dynamic", "'dynamic' or a fixed size (cached tokens)")

    def __post_init__(self):
        for axis in ("batch", "sequence", "past_sequence"):
            value = getattr(self, axis)
            if not (value == "dynamic" or (isinstance(value, int) and value >= (0 if axis == "past_sequence" else 1))):
                raise ConfigError(f"{value!r}: use 'dynamic' or a positive size", f"graph.dynamic_axes.{axis}")

    def plan_axes(self) -> dict[str, str | int]:
        """The plan's axes: a symbolic name (the axis's own) for 'dynamic', else the fixed size."""
        return {axis: axis if value == "dynamic" else int(value) for axis, value in vars(self).items()}


@dataclass(frozen=True)
class GraphConfig:
    operator_set: str = setting("contrib", "standard: plain ONNX ops | contrib: onnxruntime fused kernels "
                                "(GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization, MatMulNBits)",
                                OPERATOR_SETS)
    opset: int = setting(21, "ONNX opset of the default domain (17-23)")
    max_sequence_length: int = setting(4096, "largest position + 1 the graph accepts (rotary tables); 0: the "
                                       "model's max_position_embeddings")
    dynamic_axes: DynamicAxesConfig = section(DynamicAxesConfig)
    kv_cache_layout: str = setting("BNSH", "(B, n_kv, T, hd), the layout GroupQueryAttention uses", ("BNSH",))
    insert_slice: bool | None = setting(None, "logits of the last position only: faster prefill, but no "
                                        "perplexity/scoring over every position; null: as the package's config.json "
                                        "says (insert_slice)")
    dual_chunk_attention: bool | None = setting(None, "Dual Chunk Attention in the graph: null: as the package's "
                                                "config.json says (dual_chunk_attention_config) | false: plain "
                                                "attention (contexts up to what the model was trained on) | true: "
                                                "required (an error without the config)")
    external_data: str = setting("auto", "auto: weights in model.onnx.data when over 256 MB | always | never",
                                 ("auto", "always", "never"))

    def __post_init__(self):
        if not 0 <= self.max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ConfigError(f"{self.max_sequence_length}: must be 1..{MAX_SEQUENCE_LENGTH:,} (the rotary tables "
                              "grow with it), or 0 for the model's max_position_embeddings",
                              "graph.max_sequence_length")


@dataclass(frozen=True)
class FP16Config:
    on_overflow: str = setting("keep_fp32", "keep_fp32: parts whose activations pass the fp16 range run in fp32 | "
                               "error: stop with NumericalOverflowError", ("keep_fp32", "error"))
    headroom: float = setting(4.0, "a part is kept in fp32 when its largest activation on the probe text exceeds "
                              "65504 / headroom")

    def __post_init__(self):
        if self.headroom < 1:
            raise ConfigError("must be >= 1 (1 keeps fp16 up to its full range of 65504)", "fp16.headroom")


@dataclass(frozen=True)
class RuntimeConfig:
    optimization_level: str = setting("all", "onnxruntime graph optimisation: disable | basic | extended | all",
                                      ("disable", "basic", "extended", "all"))
    threads: int = setting(0, "intra-op threads (0: the workbook's, the free cores or $QWEN2LIB_THREADS)")

    def __post_init__(self):
        if self.threads < 0:
            raise ConfigError("must be >= 0", "runtime.threads")


@dataclass(frozen=True)
class VerifyConfig:
    prompt_tokens: int = setting(24, "parity prompt length")
    decode_steps: int = setting(16, "cached decode steps compared after the prompt")
    blocks: int | None = setting(None, "held-out text blocks for the fidelity report (null: notebook 03's sample for "
                                       "the model: 4, or 16 for a trained checkpoint other than tiny)")
    block_tokens: int | None = setting(None, "tokens per block (null: 64, or 128 for a trained checkpoint)")
    max_abs_dlogits: float | None = setting(1.0e-4, "parity bound vs the torch fp32 reference (null: report only)")
    max_kld_mean: float | None = setting(None, "fidelity bound: mean KL(ref || graph) per token")
    min_top1_agreement: float | None = setting(None, "fidelity bound: share of positions with the same argmax")
    max_ppl_ratio: float | None = setting(None, "fidelity bound: perplexity(graph) / perplexity(ref)")

    def __post_init__(self):
        for key in ("prompt_tokens", "decode_steps", "blocks", "block_tokens"):
            value = getattr(self, key)
            if value is not None and value < (0 if key == "decode_steps" else 1):
                raise ConfigError("must be a positive count", f"verify.{key}")


# GraphPlan field -> the YAML key a plan error is reported at
PLAN_KEYS = {"precision": "precision", "dtype": "precision", "operator_set": "graph.operator_set",
             "opset": "graph.opset", "quantize": "quantization.modules", "block_size": "quantization.block_size",
             "granularity": "quantization.granularity", "activations": "quantization.activations",
             "per_block_projections": "quantization.per_block_projections",
             "max_sequence_length": "graph.max_sequence_length", "dual_chunk": "graph.dual_chunk_attention",
             **{axis: f"graph.dynamic_axes.{axis}" for axis in ("batch", "sequence", "past_sequence")}}


@dataclass(frozen=True)
class CompileConfig:
    name: str | None = setting(None, "output folder under <workdir>/compiled/ (default: the YAML file's name)")
    base: str | None = setting(None, "another config this one extends, relative to this file (merged on load)",
                               file=True)
    source: SourceConfig = section(SourceConfig)
    precision: str = setting("fp32", "fp32 | fp16 | int8 | int4 (notebook 03's int4 package; the groups it leaves in "
                             "float, e.g. the head, int8): how the graph stores its weights and computes",
                             tuple(PRECISION_DTYPE))
    quantization: QuantizationConfig = section(QuantizationConfig)
    graph: GraphConfig = section(GraphConfig)
    fp16: FP16Config = section(FP16Config)
    runtime: RuntimeConfig = section(RuntimeConfig)
    verify: VerifyConfig = section(VerifyConfig)
    origin: str | None = field(default=None, compare=False)  # the YAML file it was loaded from (None: a dict)

    def __post_init__(self):
        self.graph_plan()  # the graph rules, checked where they live
        q, g = self.quantization, self.graph
        if self.precision == "int4" and not q.package and q.from_scheme is None:
            raise ConfigError(f"precision int4 takes notebook 03's int4 package: name one of "
                              f"{', '.join(INT4_SCHEMES)}", "quantization.from_scheme")
        if self.quantized and not q.package and q.int4_scheme != (self.precision == "int4"):
            raise ConfigError(f"{q.from_scheme} is {'an int4' if q.int4_scheme else 'an int8'} package: precision "
                              f"{self.precision} takes "
                              f"{' or '.join(INT4_SCHEMES if self.precision == 'int4' else INT8_SCHEMES)}",
                              "quantization.from_scheme")
        if self.traced and g.opset < 18:
            raise ConfigError(f"{g.opset}: the standard-ops graph of a deploy package is traced by torch.onnx.export, "
                              "which emits opset 18 or later", "graph.opset")
        if q.per_block_projections == "auto" and not q.package and (self.source.package == "checkpoint"
                                                                    or q.from_scheme is None):
            raise ConfigError("auto reads the calibration statistics of notebook 03's package: use source.package: "
                              "patched with a from_scheme, or list the projections",
                              "quantization.per_block_projections")
        if self.name is not None:
            try:  # the name becomes <workdir>/compiled/<name>: one folder name, never a path
                check_component(self.name, "name")
            except ValueError as exc:
                raise ConfigError(str(exc), "name") from None

    @property
    def quantized(self) -> bool:
        """int8/int4: the weights come from notebook 03's package (or are rounded here)."""
        return self.precision in QUANTIZED

    @property
    def traced(self) -> bool:
        """The standard-ops fp32 graph of a deploy package is traced by torch.onnx.export, not built."""
        return self.graph.operator_set == "standard" and self.precision == "fp32" and self.source.package == "patched"

    def graph_plan(self, *, max_position_embeddings: int | None = None, insert_slice: bool = False,
                   dual_chunk: tuple[int, int] | None = None, per_block: tuple[str, ...] | None = None,
                   keep_fp32: frozenset = frozenset()) -> GraphPlan:
        """The GraphPlan this config asks for, given what the package decides (defaults: nothing yet; ``auto``
        projections then stand for all of them). A rule the plan refuses is a ConfigError at its YAML key."""
        g, q = self.graph, self.quantization
        last = insert_slice if g.insert_slice is None else g.insert_slice
        if per_block is None:
            per_block = PROJECTIONS if q.per_block_projections == "auto" else q.per_block_projections
        try:
            return GraphPlan(
                precision=self.precision, operator_set=g.operator_set, opset=g.opset,
                dtype=PRECISION_DTYPE[self.precision], quantize=tuple(q.modules) if self.quantized else (),
                block_size=q.block_size, granularity=q.granularity, activations=q.activations,
                per_block_projections=tuple(per_block), dual_chunk=dual_chunk,
                max_sequence_length=g.max_sequence_length or max_position_embeddings or MAX_SEQUENCE_LENGTH,
                **g.dynamic_axes.plan_axes(), insert_slice=bool(last), keep_fp32=keep_fp32)
        except PlanError as exc:
            raise ConfigError(exc.message, PLAN_KEYS.get(exc.field)) from None

    def as_dict(self) -> dict:
        """The resolved config as plain data (lists, not tuples), without ``base`` (already merged) and ``origin``:
        what the stage key and manifest.json record."""
        return {k: v for k, v in _plain(self).items() if k not in ("base", "origin")}


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return list(value) if isinstance(value, tuple) else copy.deepcopy(value)


# ---- the schema, read from the dataclasses -------------------------------------------------------

def _keys(cls) -> dict[str, dataclasses.Field]:
    """The YAML keys of a section: its fields with ``setting`` or ``section`` metadata."""
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata}


def _yaml_types(cls, name: str) -> tuple:
    """What YAML may hold for a key, from its annotation: ``tuple[str, ...] | str`` -> (list, str)."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return tuple(list if typing.get_origin(a) in (tuple, list) else a for a in args)


def _type_names(types_: tuple) -> list[str]:
    return ["null" if t is NONE else t.__name__ for t in types_]


def describe_schema(cls=CompileConfig, prefix: str = "") -> list[dict]:
    """Every key: dotted name, types, default, choices and meaning (the notebook prints this table)."""
    rows = []
    for key, f in _keys(cls).items():
        if f.metadata.get("section"):
            rows += describe_schema(f.default_factory, f"{prefix}{key}.")
        else:
            rows.append({"key": prefix + key, "type": " | ".join(_type_names(_yaml_types(cls, key))),
                         "default": _plain(f.default), "choices": f.metadata["choices"], "meaning": f.metadata["doc"]})
    return rows


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
        raise MissingInputError(f"compile config {path} does not exist: pass one of the YAML files in configs/ "
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


def _check(data: dict, cls, lines: dict, path: str | None, base_dir: Path | None, prefix: str = "") -> None:
    """Unknown keys, wrong types, bad choices and missing files, each named with its line."""
    keys = _keys(cls)
    for key, value in data.items():
        key = str(key)
        full = prefix + key
        line = lines.get(full)
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"section {prefix[:-1]!r}" if prefix else "the top level"
            raise ConfigError(f"unknown key{hint}; {where} allows {', '.join(keys)}", full, line, path)
        meta = keys[key].metadata
        if meta.get("section"):
            inner = keys[key].default_factory
            if not isinstance(value, dict):
                raise ConfigError(f"must be a section with keys {', '.join(_keys(inner))}, got {_type_name(value)}",
                                  full, line, path)
            _check(value, inner, lines, path, base_dir, full + ".")
            continue
        types_ = _yaml_types(cls, key)
        if not _type_ok(value, types_):
            hint = ""
            if float in types_ and isinstance(value, str):
                try:
                    float(value)
                    hint = " (YAML reads 1e-4 as text: write 1.0e-4)"
                except ValueError:
                    pass
            raise ConfigError(f"expected {' or '.join(_type_names(types_))}, got {_type_name(value)} {value!r}{hint}",
                              full, line, path)
        if meta["choices"] is not None and value not in meta["choices"]:
            shown = ", ".join("null" if c is None else str(c) for c in meta["choices"])
            raise ConfigError(f"{value!r} is not one of {shown}", full, line, path)
        if meta["file"] and value is not None:
            target = Path(os.path.expanduser(value))
            if not target.is_absolute() and base_dir is not None:
                target = base_dir / target
            if not target.exists():
                raise ConfigError(f"{value!r} does not exist (resolved to {target})", full, line, path)


def _type_ok(value, types_) -> bool:
    if isinstance(value, bool):  # YAML true/false must not pass as an int or float
        return bool in types_
    if isinstance(value, int) and float in types_ and int not in types_:
        return True  # 1 is a fine float
    return isinstance(value, types_)


def _type_name(value) -> str:
    return "null" if value is None else ("a mapping" if isinstance(value, dict) else type(value).__name__)


def _absolutize(data: dict, cls, base_dir: Path) -> None:
    """File keys are written relative to their YAML file; store them absolute so a config means the same
    thing whatever the working directory."""
    keys = _keys(cls)
    for key, value in data.items():
        f = keys.get(key)
        if f is None:
            continue
        if f.metadata.get("section") and isinstance(value, dict):
            _absolutize(value, f.default_factory, base_dir)
        elif f.metadata.get("file") and isinstance(value, str) and key != "base":
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
    _check(data, CompileConfig, lines, str(path), path.parent)
    _absolutize(data, CompileConfig, path.parent)
    where = {k: (str(path), line) for k, line in lines.items()}
    if data.get("base"):
        base_data, base_where = _load_file(path.parent / data["base"], seen + (path,))
        data = _merge(base_data, {k: v for k, v in data.items() if k != "base"})
        where = {**base_where, **where}
    return data, where


def _build(cls, data: dict, **extra):
    """A (checked) dict -> the section's dataclass: nested sections built, YAML lists made tuples."""
    kwargs = dict(extra)
    for key, value in data.items():
        f = _keys(cls)[key]
        if f.metadata.get("section"):
            value = _build(f.default_factory, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


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


def load_config(source: str | os.PathLike | dict | CompileConfig, overrides: dict | None = None) -> CompileConfig:
    """The validated ``CompileConfig``, defaults filled; ``overrides`` maps dotted keys to values.

    ``cfg.name`` is the output folder name (default: the file's stem); ``cfg.origin`` the file it came from.
    """
    if isinstance(source, CompileConfig):  # checked already: only the overrides are new
        return dataclasses.replace(load_config(source.as_dict(), overrides), origin=source.origin)
    if isinstance(source, dict):
        data = copy.deepcopy(source)
        data.pop("_source", None)  # a manifest's record of the file
        path, where = None, {}
        _check(data, CompileConfig, {}, None, Path.cwd())
        if data.get("base"):
            base, where = _load_file(Path(data["base"]))
            data = _merge(base, {k: v for k, v in data.items() if k != "base"})
    else:
        path = Path(source)
        data, where = _load_file(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
        where[dotted] = ("--set", None)
    _check(data, CompileConfig, {}, "overrides" if overrides else None, Path.cwd())
    data.pop("base", None)
    if not data.get("name"):
        data["name"] = path.stem if path is not None else f"qwen2_{data.get('precision', CompileConfig.precision)}"
    try:
        return _build(CompileConfig, data, origin=str(path.resolve()) if path is not None else None)
    except ConfigError as exc:
        if exc.path is not None or exc.line is not None:
            raise
        # a name from the defaults is the file's; any other key's line is where it was written
        fallback = (str(path) if path else None, None) if exc.key == "name" else (None, None)
        raise exc.located(where, fallback) from None
