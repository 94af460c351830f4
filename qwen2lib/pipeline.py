"""Any stage by its name: its folder (``ensure``), or a backend that runs it (``load_backend``, ``stage_backend``).

The stage modules depend on ``stages`` (the reuse rule) and the generation loop knows only the backend protocol;
this module sits above all of them, so looking a stage up by name needs no import inside a function.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .artifacts import default_workdir
from .calibrate.stage import ensure_calibration
from .compile.manifest import GraphManifest
from .compile.stage import ensure_compiled
from .deploy import ensure_patched, load_deploy_package
from .errors import BadInputError
from .export.stage import ensure_exported
from .model import footprint
from .model.footprint import INFERENCE_CONTEXT, TORCH_DTYPES, available_bytes, backend_bytes, estimate, release_free_memory
from .serve.generation import OnnxBackend, TorchBackend
from .model.loading import checkpoint_dir, load_model, parse_dtype
from .model.long_context import LongContextError, announce, announce_graph, apply_overrides, workdir_tag
from .quantize.stage import ensure_quantized, load_quantized
from .model.registry import read_folder_config, resolve
from .stages.reuse import GRAPH

BUILDERS = {"patched": ensure_patched, "calibration": ensure_calibration, "quantized": ensure_quantized,
            "compiled": ensure_compiled, "exported": ensure_exported}


def ensure(stage: str, model: str = "tiny", weights: str = "auto", workdir: str | os.PathLike | None = None,
           **request) -> Path:
    """The folder of ``stage`` for this model and request, reused or (re)built with everything before it."""
    if stage == "checkpoint":
        return checkpoint_dir(model, weights, request.get("seed", 0))
    if stage not in BUILDERS:
        raise BadInputError(f"stage {stage!r}: one of {', '.join(GRAPH[:-1])} (inference is notebooks 05 and 06's report)")
    return BUILDERS[stage](model, weights, workdir, **request)


# ---- a backend by name: a checkpoint, a compiled graph, or one of notebooks 05 and 06's stages ----------

def check_memory(model: str, label: str, shape: Mapping | None = None, long_context: dict | None = None,
                 available: int | None = None) -> footprint.Estimate:
    """Refuse (InsufficientMemoryError, one line with the numbers and what would fit) a backend whose weights, KV
    cache and activations exceed the memory available, from config.json alone: before any weight is read, any
    stage built or any random checkpoint written. ``label``: ``footprint.backend_bytes``'s ("bf16 torch", "int8
    graph", ...); ``shape``: the run's context (positions a row, at most the model's), batch, prompt_tokens,
    prefill_rows, all_logits (``footprint.inference_estimate``; default one row of 4096 positions)."""
    spec = resolve(model)
    config = apply_overrides(dict(spec.config), long_context)
    shape = dict(shape or {})
    positions = int(config.get("max_position_embeddings") or INFERENCE_CONTEXT)
    shape["context"] = max(1, min(shape.get("context") or INFERENCE_CONTEXT, positions))
    return footprint.check_fits(config, "inference", spec.name, label, available, **shape)


def backend_label(backend: str, dtype="float32", precision: str = "fp32", compiled: str | Path | None = None) -> str:
    """The footprint label of a ``load_backend`` request: "fp32 torch", "bf16 torch", "int8 graph" (a given
    compiled folder's own precision, from its manifest)."""
    if backend == "torch":
        name = str(parse_dtype(dtype)).removeprefix("torch.")
        return next(short for short, long in TORCH_DTYPES.items() if long == name) + " torch"
    if backend != "onnx":
        raise BadInputError(f"backend={backend!r}: use 'torch' or 'onnx'")
    if compiled is not None and (Path(compiled) / "manifest.json").is_file():
        precision = GraphManifest.read(compiled).compiled_precision or precision
    return f"{precision} graph"


def load_backend(model: str = "tiny", backend: str = "torch", *, weights: str = "auto", dtype="float32",
                 seed: int = 0, compiled: str | Path | None = None, workdir: str | Path | None = None,
                 precision: str = "fp32", long_context: dict | None = None, spinning: bool = True,
                 shape: Mapping | None = None):
    """A ready backend by name: the transformers model (torch) or the compiled graph (onnx), checked first to fit
    in memory (``check_memory`` with the run's ``shape``); its ``runs`` attribute names what it runs.

    The onnx backend reads ``compiled`` if given, else builds or reuses ``<workdir>/compiled``. The checkpoint's
    long-context settings (Dual Chunk Attention, rope scaling), changed by ``long_context`` (config.json overrides
    from ``qwen2lib.model.long_context``), are honoured by both and named on stderr: a torch run with DCA uses the deploy
    package (transformers' own Qwen2 ignores it); onnx with overrides compiles its own package and graph in
    ``<workdir>/long_context/<settings>/``. ``spinning``: see ``graph.runtime.session_options``.
    """
    if backend == "onnx" and long_context and compiled is not None:
        raise LongContextError("--dca/--yarn cannot change a compiled folder (it runs the config it was compiled "
                               "with): drop --compiled to compile one with these settings")
    check_memory(model, backend_label(backend, dtype, precision, compiled), shape, long_context)
    config = apply_overrides(read_folder_config(checkpoint_dir(model, weights, seed)), long_context)
    if backend == "torch":
        announce(config, "torch")
        if config.get("dual_chunk_attention_config"):
            package = ensure_patched(model, weights, workdir, seed=seed, verbose=False)
            lm = load_deploy_package(package, dtype, config_overrides=long_context)
            lm.config.insert_slice = False  # every position's logits (eval), whatever the package was built with
            return _runs(TorchBackend(lm), package, _torch_precision(dtype, "deploy package, Dual Chunk Attention"))
        out = TorchBackend(load_model(model, dtype=dtype, weights=weights, seed=seed, config_overrides=long_context))
        return _runs(out, checkpoint_dir(model, weights, seed), _torch_precision(dtype, "transformers' Qwen2"))
    if compiled is None:
        if long_context:
            workdir = (Path(workdir) if workdir else default_workdir(model)) / "long_context" / workdir_tag(long_context)
            ensure_patched(model, weights, workdir, seed=seed, config_overrides=long_context, verbose=False)
        compiled = _ensure_graph(model, weights, workdir, seed, precision, long_context_graph=bool(long_context))
    return _load_graph(compiled, config, spinning)


def _load_graph(compiled: str | Path, config: dict, spinning: bool) -> OnnxBackend:
    out = OnnxBackend.load(compiled, config, spinning=spinning)
    out.config = config
    announce_graph(out.runtime.manifest.dual_chunk_attention, config)
    return _runs(out, compiled, graph_precision(out.runtime.manifest))


# What each precision corresponds to in llama.cpp's GGUF types (the closest one: Q8_0 is int8 with one fp16 scale
# a 32-weight block, Q4_0 int4 likewise), so a run can be compared with the tools people know.
LLAMA_CPP = {"fp32": "F32", "float32": "F32", "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16",
             "int8": "Q8_0", "int4": "Q4_0"}
ACTIVATIONS = {"int8_per_tensor": "A8 dynamic", "int8_per_block": "A8 dynamic per block", "float": "A16"}


def graph_precision(manifest: GraphManifest) -> str:
    """"(int8 weights per channel, W8A8 dynamic; ~llama.cpp Q8_0)" from a compiled graph's manifest (its config's
    precision and quantization; a bare graph without one reads "?")."""
    config = manifest.config
    precision = manifest.compiled_precision or "?"
    if precision not in ("int8", "int4"):
        return f"({precision} weights; ~llama.cpp {LLAMA_CPP.get(precision, '?')})"
    quantization = config.get("quantization") or {}
    if precision == "int4":
        granularity = "per group"  # the int4 package's own group size (notebook 03), not the config's
    elif quantization.get("granularity") == "per_block":
        granularity = f"per block of {quantization.get('block_size')}"
    else:
        granularity = "per channel"
    activations = ACTIVATIONS.get(quantization.get("activations"), "A?")
    return f"({precision} weights {granularity}, W{precision[-1]}{activations}; ~llama.cpp {LLAMA_CPP[precision]})"


def _torch_precision(dtype, what: str) -> str:
    name = str(parse_dtype(dtype)).removeprefix("torch.")
    return f"in torch {name} ({what}; ~llama.cpp {LLAMA_CPP[name]})"


# notebook 03's int8 packages, run in torch (deploy.quantizer.Int8Linear)
INT8_TORCH = {"w8a16": "in torch (int8 weights per channel, bf16 activations: W8A16; ~llama.cpp Q8_0)",
              "smoothquant": "in torch (int8 weights per channel and int8 activations: SmoothQuant W8A8; "
                             "~llama.cpp Q8_0)"}


def _runs(backend, folder: str | Path, precision: str):
    """Name what ``backend`` runs in ``backend.runs`` (the folder, its precision, llama.cpp's closest type) for the
    commands' one line; the folder as the user would type it, relative to the current folder when under it."""
    path = Path(folder).resolve()
    where = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    backend.runs = f"{where} {precision}"
    return backend


def _ensure_graph(model, weights, workdir, seed, precision, config: str | None = None,
                  last_position_only: bool = False, long_context_graph: bool = False) -> Path:
    workdir = Path(workdir) if workdir else default_workdir(model)
    config = config or f"qwen2_{precision}"
    # Generation reads the last position's logits only: such a graph skips (T - 1) x hidden x vocab of head work
    # per prefill. It is compiled beside the full-logits graph (perplexity and scoring need every position).
    overrides = {"graph.insert_slice": True, "name": f"{config}_last"} if last_position_only else {}
    if long_context_graph:  # as many positions as the long-context config.json allows
        overrides["graph.max_sequence_length"] = 0
    return Path(ensure_compiled(model, weights, workdir, config=config, seed=seed, overrides=overrides or None))


# The ways notebooks 05 and 06 run a model, each built from (or reusing) the earlier stages' folders: the transformers
# reference, notebook 03's two int8 packages in torch, and notebook 04's graphs (int8: one per package).
STAGE_BACKENDS = ("fp32 torch", "int8 torch", "int8 torch smoothquant", "fp32 graph", "fp16 graph", "int8 graph",
                  "int8 graph smoothquant")
ACCURACY_STAGES = STAGE_BACKENDS  # notebook 06 scores every stage notebook 05 runs


def stage_backend(label: str, model: str = "tiny", *, weights: str = "auto", workdir: str | Path | None = None,
                  seed: int = 0, dtype="float32", last_position_only: bool = False, spinning: bool = True,
                  shape: Mapping | None = None):
    """One of ``STAGE_BACKENDS``: the reference, one of notebook 03's int8 packages, or a graph of notebook 04,
    checked to fit in memory (``check_memory``) before anything is built or loaded; ``backend.runs`` names it.
    ``last_position_only``: a graph's logits for the last position only (serving: faster prefill; no ``logits``)."""
    if label not in STAGE_BACKENDS:
        raise BadInputError(f"unknown backend {label!r}: one of {', '.join(STAGE_BACKENDS)}")
    scheme = "smoothquant" if label.endswith(" smoothquant") else "w8a16"
    if label == "fp32 torch":
        return load_backend(model, "torch", weights=weights, dtype=dtype, seed=seed, shape=shape)
    check_memory(model, label, shape)
    if label.startswith("int8 torch"):
        workdir = Path(workdir) if workdir else default_workdir(model)
        package = ensure_quantized(model, weights, workdir, seed=seed, scheme=scheme)
        return _runs(TorchBackend(load_quantized(package)), package, INT8_TORCH[scheme])
    precision = label.split()[0]
    compiled = _ensure_graph(model, weights, workdir, seed, precision,
                             "qwen2_int8_smoothquant" if scheme == "smoothquant" else None, last_position_only)
    return _load_graph(compiled, read_folder_config(checkpoint_dir(model, weights, seed)), spinning)


class StageBackends(Mapping):
    """Notebooks 05 and 06's backends by label, each loaded when first asked for and kept while memory allows.

    ``keep`` (the reference) stays loaded until ``release(everything=True)``. When twice the weights of all of
    them (``footprint.backend_bytes``; twice: loading a graph and running it need about as much again) fit in the
    memory available at the start, every backend stays once loaded; otherwise at most ``max_held`` (default 1)
    besides ``keep``. Before another backend loads, the ones held longest are closed (``Backend.close``: whoever
    still holds such an object holds no weights) until that count holds and the machine has room for one fp32
    graph with its cache (``footprint.estimate``, the widest a stage gets). At 0.5B on an idle 24 GiB machine
    all stay; at 1.5B the reference and one other.
    """

    def __init__(self, model: str = "tiny", *, labels=STAGE_BACKENDS, keep=("fp32 torch",),
                 max_held: int | None = None, **request):
        unknown = [label for label in (*labels, *keep) if label not in STAGE_BACKENDS]
        if unknown:
            raise BadInputError(f"unknown backend {unknown[0]!r}: one of {', '.join(STAGE_BACKENDS)}")
        self.model, self.labels, self.keep, self.max_held, self.request = model, tuple(labels), set(keep), max_held, request
        self.held: dict[str, object] = {}  # label -> backend, oldest first
        config = read_folder_config(checkpoint_dir(model, request.get("weights", "auto"), request.get("seed", 0)))
        self.room_needed = estimate(config, "inference", "fp32").resident_bytes
        self.all_fit = 2 * sum(backend_bytes(config, label) for label in self.labels) <= available_bytes()
        if max_held is None and not self.all_fit:
            self.max_held = 1

    def __getitem__(self, label: str):
        if label not in self.labels:
            raise KeyError(label)
        if label in self.held:
            self.held[label] = self.held.pop(label)  # most recently used last
        else:
            self._make_room()
            self.held[label] = stage_backend(label, self.model, **self.request)
        return self.held[label]

    def __contains__(self, label) -> bool:  # without loading it
        return label in self.labels

    def __iter__(self):
        return iter(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def _make_room(self) -> None:
        def others():
            return [label for label in self.held if label not in self.keep]
        while others() and ((self.max_held is not None and len(others()) >= self.max_held)
                            or available_bytes() < self.room_needed):
            self.held.pop(others()[0]).close()
            release_free_memory()

    def release(self, everything: bool = False) -> None:
        """Close every held backend but ``keep`` (all of them with ``everything``): before a stage that loads whole
        models of its own, such as an export's verification."""
        for label in [label for label in self.held if everything or label not in self.keep]:
            self.held.pop(label).close()
        release_free_memory()
