"""A compiled folder's manifest.json as one typed record: what the compiler writes and the runtime takes.

    m = GraphManifest.read("runs/tiny/compiled/qwen2_int8")
    m.operator_set, m.max_sequence_length, m.dual_chunk_attention, m.fidelity["kld_mean"]
    OnnxCausalLM.load(folder)                  # reads it (folder) or is handed one (the compiler, before writing)
    GraphManifest.for_bare_graph(proto)        # what a .onnx file without its folder says about itself

The runtime reads ``operator_set``, ``max_sequence_length``, ``dual_chunk_attention``, ``graph_file`` and
``runtime``; the rest is the compile's record (config, sources, precision per weight group, parity, fidelity,
files and their hashes) that notebook 04 and ``qwen2lib compile --show`` print.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import MissingInputError

MANIFEST_FORMAT = "qwen2lib-compiled/1"
GRAPH_FILE = "model.onnx"
# The name scope of the Dual Chunk Attention nodes (``dual_chunk.py`` builds them): how a bare graph, without its
# manifest, shows that it takes the DCA inputs. Here, so running a graph never imports the graph builder.
DUAL_CHUNK_SCOPE = "/model/dual_chunk"
NO_LIMIT = 1 << 62  # a bare graph's positions: its rotary table decides, the runtime cannot tell


@dataclass(frozen=True)
class GraphManifest:
    """manifest.json, field for field (``to_dict`` writes it, ``from_dict`` reads it back)."""

    # what running the graph needs
    operator_set: str = "standard"  # "contrib": com.microsoft ops (GroupQueryAttention, MatMulNBits, ...)
    max_sequence_length: int = NO_LIMIT
    dual_chunk_attention: dict | None = None  # {"chunk_size", "local_size"}: the graph takes the DCA inputs
    insert_slice: bool = False  # logits for the last position only
    config: dict = field(default_factory=dict)  # the compile config (CompileConfig.as_dict() and its "_source")
    graph: dict = field(default_factory=lambda: {"file": GRAPH_FILE})  # file, external data, opsets, node count
    # what the compile recorded
    format: str = MANIFEST_FORMAT
    name: str = ""
    source: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)
    rope_scaling: dict | None = None
    kv_cache: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    precision: dict = field(default_factory=dict)
    op_histogram: dict = field(default_factory=dict)
    fp16_probe: dict | None = None
    verify_text: str = ""
    parity: dict = field(default_factory=dict)
    fidelity: dict = field(default_factory=dict)
    limits: list = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    @property
    def graph_file(self) -> str:
        return self.graph.get("file") or GRAPH_FILE

    @property
    def runtime(self) -> dict:
        """The compile config's ``runtime`` section (threads, optimization level), {} for a bare graph."""
        return self.config.get("runtime") or {}

    @property
    def compiled_precision(self) -> str | None:
        """The config's precision (fp32, fp16, int8, int4); None for a bare graph."""
        return self.config.get("precision")

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / "manifest.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict, where: str = "manifest") -> "GraphManifest":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if data.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT or unknown:
            what = f"format {data.get('format')!r}" if not unknown else f"unknown keys {', '.join(unknown)}"
            raise MissingInputError(f"{where} was written by another qwen2lib ({what}; this one reads "
                                    f"{MANIFEST_FORMAT}): compile it again (`qwen2lib compile CONFIG`)")
        return cls(**data)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "GraphManifest":
        path = Path(folder) / "manifest.json"
        if not path.is_file():
            raise MissingInputError(f"{path} does not exist: compile first (`qwen2lib compile CONFIG`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise MissingInputError(f"{path} is not JSON (damaged?): compile it again (`qwen2lib compile CONFIG`)") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def for_bare_graph(cls, proto) -> "GraphManifest":
        """What an ONNX model (loaded without its weights) says about itself: contrib ops, DCA nodes."""
        contrib = "com.microsoft" in {o.domain for o in proto.opset_import}
        dca = any(node.name.startswith(DUAL_CHUNK_SCOPE + "/") for node in proto.graph.node)
        # sizes unknown without the manifest; the runtime only needs to know the graph takes the DCA inputs
        return cls(operator_set="contrib" if contrib else "standard",
                   dual_chunk_attention={"chunk_size": None, "local_size": None} if dca else None)
