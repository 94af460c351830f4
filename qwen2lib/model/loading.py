"""Find a checkpoint (folder, $QWEN2LIB_MODELS, Hugging Face cache, hub) and load it as transformers' Qwen2."""
from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import Qwen2ForCausalLM

from ..artifacts import atomic_dir
from ..errors import UnsupportedDtypeError, WeightsError, WeightsUnavailableError
from .footprint import check_disk, check_fits, parameter_counts
from .long_context import hf_config_with
from ..paths import cache_root, local_models_root
from .random_weights import RANDOM_RECIPE, expected_tensor_shapes, write_random_checkpoint
from .registry import ModelSpec, read_folder_config, resolve
from .tensorio import header_of
from .tiny import tiny_dir
from .tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
WEIGHT_MODES = ("auto", "random")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or the torch dtype) -> torch dtype; anything else is refused."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        name = str(dtype)
    else:
        name = str(dtype).lower().removeprefix("torch.")
        if name in DTYPES:
            return DTYPES[name]
    raise UnsupportedDtypeError(
        f"dtype {name!r} is not supported: use float32 (reference), bfloat16 (what Qwen was trained in) "
        "or float16 (may overflow on bf16-trained checkpoints)"
    )


def check_safetensors(folder: Path) -> list[Path]:
    """The folder's safetensors files, each checked whole: index complete, headers parse, sizes match."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        shards = sorted({folder / name for name in index.get("weight_map", {}).values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise WeightsError(
                f"{folder} is missing shard(s) {', '.join(missing)} named in model.safetensors.index.json: "
                "the download was interrupted; download the checkpoint again"
            )
    else:
        shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise WeightsError(
                f"{folder} has only pickle weights ({', '.join(pickles[:3])}): qwen2lib loads safetensors only, "
                "since unpickling runs arbitrary code. Convert once in a trusted environment: "
                "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)"
            )
        raise WeightsError(f"{folder} has no *.safetensors weights: download the checkpoint (config.json plus *.safetensors)")
    for shard in shards:
        _check_one_safetensors(shard)
    return shards


def check_weights_match_config(folder: Path) -> None:
    """Refuse, from the safetensors headers alone (nothing loaded), a checkpoint whose tensors do not match
    its config.json: transformers would fill missing layers with random weights or drop extra ones."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    expected = expected_tensor_shapes(config)
    found: dict[str, tuple[int, ...]] = {}
    for shard in check_safetensors(folder):
        for name, info in header_of(shard).items():
            if name != "__metadata__":
                found[name] = tuple(info["shape"])
    # a tied checkpoint may still carry lm_head (it equals the embedding); old ones carry rotary buffers
    optional = {"lm_head.weight"} if config.get("tie_word_embeddings", False) else set()
    where = f"{folder}: config.json ({config['num_hidden_layers']} layers, hidden {config['hidden_size']})"
    for name, shape in expected.items():
        if name not in found:
            raise WeightsError(f"{where} needs {name} {list(shape)}, which the weights lack: config.json and the "
                               "*.safetensors do not belong together; download the checkpoint again")
        if found[name] != shape:
            raise WeightsError(f"{where} says {name} is {list(shape)} but the weights hold {list(found[name])}: "
                               "config.json and the *.safetensors do not belong together")
    extra = sorted(n for n in found if n not in expected and n not in optional and not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise WeightsError(f"{where} has no place for {extra[0]} (and {len(extra) - 1} more unexpected tensors): "
                           "config.json and the *.safetensors do not belong together")


def _check_one_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes it lists."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(fh.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path} is not a valid safetensors file ({exc}): it is corrupt; download it again") from exc
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise WeightsError(
            f"{path} is truncated: its header lists {8 + header_len + end:,} bytes but the file has {size:,}; "
            "download it again"
        )


def _hf_cache_folder(hub_id: str) -> Path | None:
    try:
        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        return None


def _download(hub_id: str) -> Path:
    return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "merges.txt", "vocab.json"]))


def unavailable_message(spec: ModelSpec, reason: str) -> str:
    # advice that works when pasted as is: with QWEN2LIB_MODELS unset, "$QWEN2LIB_MODELS/x" would mean "/x"
    root = local_models_root()
    where = (f"`hf download {spec.hub_id} --local-dir {root / spec.name}`" if root is not None else
             f"`hf download {spec.hub_id} --local-dir ~/models/{spec.name}` and `export QWEN2LIB_MODELS=~/models`")
    return (
        f"no weights for {spec.name} here ({reason}). Download them once with {where}, "
        f"or pass a checkpoint folder as the model; or run at the real shape without weights with "
        f"weights='random' (`-p weights random` in papermill, `--weights random` on the command line)"
    )


def random_checkpoint_dir(spec: ModelSpec, seed: int = 0) -> Path:
    """Materialise the registry architecture with seeded random weights once, in the cache (bf16, streamed:
    ``write_random_checkpoint``)."""
    folder = cache_root() / "random" / f"{spec.name}-seed{seed}-{RANDOM_RECIPE}"
    if not (folder / "config.json").is_file():
        print(f"[qwen2lib] RANDOM WEIGHTS: building {spec.name} at its real shape with seed {seed} "
              "(no trained weights; figures of quality mean nothing)", file=sys.stderr)
        config = spec.hf_config()
        check_fits(config.to_dict(), "checkpoint", spec.name)
        check_disk(folder.parent, 2 * parameter_counts(config.to_dict())["total"], f"the random {spec.name} checkpoint")
        with atomic_dir(folder) as tmp:
            write_random_checkpoint(config, tmp, seed)
            load_tokenizer(spec.name).save_pretrained(tmp)
    return folder


def checkpoint_dir(model: str | os.PathLike = "tiny", weights: str = "auto", seed: int = 0) -> Path:
    """A local folder with config.json, *.safetensors and tokenizer files for any model name.

    weights="auto": the folder itself, ``$QWEN2LIB_MODELS/<name>``, the Hugging Face cache, then the
    hub (when online). weights="random": the registry shape with seeded random weights, cached.
    The embedded ``tiny`` / ``tiny-random`` models are built on first use into the cache.
    """
    if weights not in WEIGHT_MODES:
        raise WeightsError(f"weights={weights!r}: use 'auto' (real checkpoint) or 'random' (seeded random init)")
    spec = resolve(model)
    if spec.embedded:
        return tiny_dir(trained=spec.name == "tiny" and weights == "auto")
    if weights == "random":
        return random_checkpoint_dir(spec, seed)
    candidates = []
    if spec.folder is not None:
        candidates.append(spec.folder)
    elif local_models_root() is not None:
        candidates.append(local_models_root() / spec.name)
    for folder in candidates:
        if folder.is_dir():
            read_folder_config(folder)
            check_weights_match_config(folder)
            return folder
    if spec.hub_id is None:
        raise WeightsUnavailableError(f"{spec.folder} has no weights")
    cached = _hf_cache_folder(spec.hub_id)
    if cached is not None and list(cached.glob("*.safetensors")):
        check_weights_match_config(cached)
        return cached
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise WeightsUnavailableError(unavailable_message(spec, "HF_HUB_OFFLINE=1 and nothing local"))
    try:
        folder = _download(spec.hub_id)
    except Exception as exc:
        raise WeightsUnavailableError(unavailable_message(spec, f"offline or hub unreachable: {type(exc).__name__}")) from exc
    check_weights_match_config(folder)
    return folder


def load_model(model: str | os.PathLike = "tiny", *, dtype: str | torch.dtype = torch.float32, weights: str = "auto", seed: int = 0,
               config_overrides: dict | None = None):
    """A transformers ``Qwen2ForCausalLM`` in eval mode for a registry name, hub id or folder.

    ``config_overrides``: config.json keys to change first (``qwen2lib.model.long_context``: YaRN).

    weights="random" loads the registry architecture's seeded random checkpoint (bf16, built once into the
    cache), upcast to ``dtype``: the same numbers every stage's package is built from.
    """
    torch_dtype = parse_dtype(dtype)
    if weights not in WEIGHT_MODES:
        raise WeightsError(f"weights={weights!r}: use 'auto' (real checkpoint) or 'random' (seeded random init)")
    spec = resolve(model)
    if weights == "random" and not spec.embedded:
        print(f"[qwen2lib] RANDOM WEIGHTS: {spec.name} at its real shape, seed {seed}; "
              "speed and shape figures are real, quality figures mean nothing", file=sys.stderr)
    # random weights too come from their (bf16) checkpoint on disk, so every stage sees the same numbers
    folder = checkpoint_dir(model, weights, seed)
    check_weights_match_config(folder)
    try:
        config = hf_config_with(folder, config_overrides)
        hf_model = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch_dtype, **({"config": config} if config else {}))
    except Exception as exc:
        raise WeightsError(f"could not load {folder}: {exc}") from exc
    return hf_model.eval()
