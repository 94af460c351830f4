"""The model registry: every published Qwen2/Qwen2.5 checkpoint plus the embedded ``tiny`` models.

A model is named by its registry name (``Qwen2-1.5B``), its hub id (``Qwen/Qwen2-1.5B``, any case)
or a local checkpoint folder. ``resolve`` turns any of these into a ``ModelSpec``.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import Qwen2Config

from ..errors import ModelNotFoundError, WrongModelTypeError
from .family import FAMILY_CONFIGS
from .gguf import gguf_checkpoint, gguf_source

# Config fields every spec carries, in the order the family table shows them.
ARCH_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
    "rope_theta",
    "max_position_embeddings",
    "sliding_window",
    "max_window_layers",
    "rms_norm_eps",
)

# The embedded default: real tokenizer and full vocabulary, everything else small enough for 2 CPU cores.
TINY_CONFIG = dict(
    vocab_size=151936,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    max_position_embeddings=4096,
    sliding_window=4096,
    max_window_layers=4,
    use_sliding_window=False,
    rms_norm_eps=1e-06,
    bos_token_id=151643,
    eos_token_id=151643,
    torch_dtype="float32",
)
EMBEDDED = {
    "tiny": "small Qwen2 trained on the Python standard library's sources, shipped with qwen2lib (the workbook default)",
    "tiny-random": "the same architecture as tiny with seeded random weights (unit tests)",
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str | None
    tokenizer_family: str  # "qwen2" (3 control tokens) or "qwen2.5" (22)
    instruct: bool
    config: dict = field(repr=False)  # config.json fields (architecture and token ids)
    folder: Path | None = None  # set when the model was named by a local folder

    @property
    def embedded(self) -> bool:
        return self.name in EMBEDDED

    def hf_config(self):
        """A ``transformers.Qwen2Config`` with this spec's architecture."""
        if self.folder is not None:
            return Qwen2Config.from_pretrained(self.folder)
        cfg = dict(self.config)
        dtype = cfg.pop("torch_dtype", None)
        config = Qwen2Config(**cfg)
        if dtype:
            config.dtype = dtype
        return config


def _spec_from_table(name: str, row: dict) -> ModelSpec:
    return ModelSpec(
        name=name,
        hub_id=row["hub_id"],
        tokenizer_family=row["tokenizer_family"],
        instruct=name.endswith("-Instruct"),
        config={k: v for k, v in row.items() if k not in ("hub_id", "tokenizer_family")},
    )


def known_names() -> list[str]:
    return list(EMBEDDED) + list(FAMILY_CONFIGS)


def list_models():
    """The registry as a pandas DataFrame: one row per model, its hub id, family and architecture."""
    import pandas as pd  # heavy and optional: only this function needs it

    rows = []
    for name in known_names():
        spec = resolve(name)
        rows.append(
            {
                "name": name,
                "hub_id": spec.hub_id or "(embedded)",
                "tokenizer_family": spec.tokenizer_family,
                "instruct": spec.instruct,
                **{k: spec.config.get(k) for k in ARCH_FIELDS},
            }
        )
    return pd.DataFrame(rows)


def read_folder_config(folder: Path) -> dict:
    """config.json of a checkpoint folder, checked to be a qwen2 model."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(
            f"{folder} has no config.json: point at a Hugging Face checkpoint folder "
            "(config.json plus *.safetensors), or use a registry name (`qwen2lib models` lists them)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelNotFoundError(f"{path} is not valid JSON ({exc}): re-download the checkpoint") from exc
    if config.get("model_type") != "qwen2":
        raise WrongModelTypeError(
            f"{path} says model_type={config.get('model_type')!r}; qwen2lib handles model_type 'qwen2' "
            "(Qwen1.5, Qwen2, Qwen2.5 and their fine-tunes) only"
        )
    return config


def _family_of_folder(folder: Path, config: dict) -> str:
    """Qwen2.5 checkpoints have 22 control tokens; without tokenizer files the folder name decides."""
    added = folder / "tokenizer_config.json"
    if added.is_file():
        decoder = json.loads(added.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        if len(decoder) >= 22:
            return "qwen2.5"
        if decoder:
            return "qwen2"
    return "qwen2.5" if "2.5" in folder.name else "qwen2"


def resolve(model: str | Path) -> ModelSpec:
    """Registry name, hub id (any case), checkpoint folder or GGUF file -> ``ModelSpec``. A GGUF is converted once
    into a checkpoint folder in the cache (``qwen2lib.model.gguf``), which the spec then names."""
    text = str(model).strip()
    folder = Path(text).expanduser()
    source = gguf_source(text)
    if source is not None:
        folder = gguf_checkpoint(source)
    if folder.is_dir():
        config = read_folder_config(folder)
        name = source.stem if source is not None else folder.resolve().name
        return ModelSpec(
            name=name,
            hub_id=None,
            tokenizer_family=_family_of_folder(folder, config),
            instruct="instruct" in name.lower() or "chat" in name.lower(),
            config=config,
            folder=folder.resolve(),
        )
    key = text.lower()
    if key in EMBEDDED:
        return ModelSpec(name=key, hub_id=None, tokenizer_family="qwen2", instruct=False, config=dict(TINY_CONFIG))
    for name, row in FAMILY_CONFIGS.items():
        if key in (name.lower(), row["hub_id"].lower()):
            return _spec_from_table(name, row)
    candidates = known_names() + [row["hub_id"] for row in FAMILY_CONFIGS.values()]
    by_lower = {c.lower(): c for c in candidates}
    close = [by_lower[c] for c in difflib.get_close_matches(key, list(by_lower), n=3, cutoff=0.5)]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ModelNotFoundError(
        f"unknown model {text!r}: not a registry name, hub id or existing folder.{hint} "
        "`qwen2lib models` lists the registry; a local checkpoint is named by its folder path"
    )
