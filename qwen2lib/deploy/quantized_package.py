"""The quantized package, written by the deploy package's quantizer: the deploy package's code and tokenizer, the
int8 modeling file, config.json with ``quantization_config``, and the quantized weights.

Every deploy package carries this file as ``quantized_package_<target>.py`` beside ``quantization_<target>.py``
(``quantizer.py``) and ``schemes_<target>.py`` (``schemes.py``), byte for byte but the two import lines below, which
there name those copies.
``save_quantized`` writes a model quantized in memory (``quantize_model``); ``quantize_checkpoint`` writes the same
tensors one decoder layer at a time, straight from the deploy package's shards, so a model of any size is quantized
with one layer in memory.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .quantizer import DEFAULT_GROUP_SIZE, QuantizationError
from .schemes import (DEFAULT_SKIP, LAYERWISE_SCHEMES, QUANT_METHOD, CalibrationRun, calibration_ids, check_request,
                      plan_modules, quantization_config, quantize_layer, replace_linears)

INT8_MODELING_FILE = "modeling_qwen2_int8.py"
INT8_CLASS = "Qwen2ForCausalLMInt8"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files of the deploy package a quantized package does not copy: its float weights, config and records.
NOT_COPIED = ("config.json", "metrics.json", INDEX_FILE, ".qwen2lib-folder")
SAVED_METADATA = {"format": "pt", "quant_method": QUANT_METHOD}
MAX_SHARD_BYTES = 2 << 30


# ---- the quantized package ----------------------------------------------------------------------

# The template's import lines start with "{from_}": transformers reads every line of a package file that starts with
# "from ." as an import of the package's own modules, this file's text included.
INT8_MODELING_SOURCE = '''"""Int8 variant of the patched Qwen2ForCausalLM, written by {quantization_module}.py.

Before the weights load, the Linears that config.quantization_config lists become Int8Linear modules
(int8 weight + fp32 weight_scale buffers), so AutoModelForCausalLM.from_pretrained(package,
trust_remote_code=True) returns the int8 model.
"""
{from_} .{patched_module} import Qwen2ForCausalLM
{from_} .{quantization_module} import convert_to_int8_modules


class {cls}(Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        quantization_config = getattr(config, "quantization_config", None)
        if quantization_config:
            convert_to_int8_modules(self, quantization_config)
'''


def package_module(package: Path, prefix: str) -> str:
    """The module name of the package's ``<prefix>_<target>.py`` (the int8 modeling file aside)."""
    found = sorted(p.stem for p in Path(package).glob(f"{prefix}_*.py") if p.name != INT8_MODELING_FILE)
    if not found:
        raise QuantizationError(f"{package} holds no {prefix}_<target>.py: is it a deploy package (notebook 01)?")
    return found[0]


def int8_code(package: str | os.PathLike) -> dict[str, str]:
    """{INT8_MODELING_FILE: text}: the one Python file a quantized package adds to the deploy package's."""
    text = INT8_MODELING_SOURCE.format(patched_module=package_module(Path(package), "modeling_qwen2"),
                                       quantization_module=package_module(Path(package), "quantization"),
                                       cls=INT8_CLASS, from_="from")
    return {INT8_MODELING_FILE: text}


def int8_auto_map(deploy_auto_map: Mapping[str, str]) -> dict[str, str]:
    return dict(deploy_auto_map, AutoModelForCausalLM=f"{Path(INT8_MODELING_FILE).stem}.{INT8_CLASS}")


def state_dict_for_saving(model) -> dict[str, torch.Tensor]:
    """Every tensor once: a tied lm_head (it shares the embedding's storage) is left to the loader to re-tie."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().contiguous().cpu()
    return state


# The token tables no scheme changes (the embedding, and a head kept in float): saved in the checkpoint's own 16-bit
# dtype when that holds them exactly, as it does for tables read from it, instead of doubling them in fp32.
TABLES = ("model.embed_tokens.weight", "lm_head.weight")
NARROW_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(src: Path) -> torch.dtype | None:
    """The 16-bit dtype the deploy package's checkpoint is stored in (config.json), None for any other."""
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    return NARROW_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")))


def narrow_tables(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``state`` with its fp32 token tables in ``dtype`` where that round trip is exact (the loader widens them
    back to the same values)."""
    out = dict(state)
    for name in TABLES:
        t = out.get(name)
        if dtype is not None and t is not None and t.dtype == torch.float32 and torch.equal(t.to(dtype).float(), t):
            out[name] = t.to(dtype)
    return out


def write_package_files(out: Path, src: Path, config: Mapping, dtype: torch.dtype) -> None:
    """Everything of a quantized package but its weights: the deploy package's code, tokenizer and notes, the int8
    modeling file, and config.json with ``quantization_config`` and the float tensors' ``dtype``."""
    if not (src / "config.json").is_file():
        raise QuantizationError(f"{src} is not the deploy package folder: pass deploy_package=<its folder>")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():  # code, tokenizer and notes; not the float weights, the records or any symlink
        if f.is_file() and not f.is_symlink() and f.suffix != ".safetensors" and f.name not in NOT_COPIED:
            shutil.copy2(f, out / f.name)
    for name, text in int8_code(src).items():
        (out / name).write_text(text, encoding="utf-8")
    package_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    package_config["auto_map"] = int8_auto_map(package_config.get("auto_map") or {})
    package_config["architectures"] = [INT8_CLASS]
    package_config["quantization_config"] = dict(config)
    # The float tensors (embeddings, norms, biases, scales) are saved as the model holds them; "auto" loading
    # must not cast them to the checkpoint's original dtype (a bf16 checkpoint would get bf16 scales).
    package_config["dtype"] = str(dtype).removeprefix("torch.")
    package_config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(package_config, indent=2) + "\n", encoding="utf-8")


def save_quantized(model, out_dir: str | os.PathLike, deploy_package: str | os.PathLike | None = None) -> Path:
    """Write the quantized package into ``out_dir`` (created if missing; use an empty folder): the deploy
    package's code and tokenizer (``deploy_package``, by default the folder the model was loaded from), the int8
    modeling file, config.json with ``quantization_config``, and the weights."""
    config = getattr(model.config, "quantization_config", None)
    if not config or config.get("quant_method") != QUANT_METHOD:
        raise QuantizationError("the model carries no quantization_config of this quantizer: call quantize() first")
    out = Path(out_dir)
    float_dtypes = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    write_package_files(out, Path(deploy_package or model.name_or_path), config,
                        max(float_dtypes, key=lambda d: torch.finfo(d).bits))
    src = Path(deploy_package or model.name_or_path)
    save_file(narrow_tables(state_dict_for_saving(model), checkpoint_dtype(src)), str(out / WEIGHTS_FILE),
              metadata=SAVED_METADATA)
    return out


# ---- quantize_checkpoint: the same, one decoder layer at a time ---------------------------------


def checkpoint_shards(folder: Path) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it} of a checkpoint folder (sharded with an index, or not)."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / shard for name, shard in weight_map.items()}
    where = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            where.update(dict.fromkeys(f.keys(), shard))
    return where


def read_tensors(where: Mapping[str, Path], names: Iterable[str], dtype: torch.dtype,
                 keep: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The named tensors, read from their (memory-mapped) shards, float ones cast to ``dtype`` (those stored as
    ``keep`` left as they are)."""
    out = {}
    for name in names:
        with safe_open(str(where[name]), "pt") as f:
            t = f.get_tensor(name)
        out[name] = t.to(dtype) if t.is_floating_point() and t.dtype != keep else t
    return out


class ShardWriter:
    """Tensors added in order, written as ``model-0000i.safetensors`` files of about ``max_bytes`` each (renamed
    ``-of-0000n`` and indexed at ``close``; one shard: ``model.safetensors``): at most one shard in memory."""

    def __init__(self, out: Path, max_bytes: int = MAX_SHARD_BYTES, metadata: Mapping[str, str] = SAVED_METADATA):
        self.out, self.max_bytes, self.metadata = out, max_bytes, dict(metadata)
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[tuple[Path, list[str]]] = []

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Add one group of tensors (a layer's): a group that would push the shard past the limit starts the next."""
        pending, adding = (sum(t.nbytes for t in group.values()) for group in (self.pending, tensors))
        if pending and pending + adding > self.max_bytes:
            self.flush()
        self.pending.update({n: t.detach().contiguous() for n, t in tensors.items()})

    def flush(self) -> None:
        if self.pending:
            path = self.out / f"model-{len(self.files) + 1:05d}.safetensors"
            save_file(self.pending, str(path), metadata=self.metadata)
            self.files.append((path, list(self.pending)))
            self.pending = {}

    def close(self) -> list[str]:
        """Name the shards as Hugging Face does (and index them when there are several); returns their names."""
        self.flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.out / WEIGHTS_FILE)
            return [WEIGHTS_FILE]
        weight_map, shards = {}, []
        for i, (path, names) in enumerate(self.files):
            final = path.with_name(f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors")
            path.rename(final)
            shards.append(final.name)
            weight_map.update(dict.fromkeys(names, final.name))
        total = sum((self.out / shard).stat().st_size for shard in shards)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return shards


@torch.no_grad()
def quantize_checkpoint(skeleton, deploy_package: str | os.PathLike, out_dir: str | os.PathLike,
                        scheme: str = "w8a16", *, stats=None, alpha: float = 0.5, skip: Iterable[str] = DEFAULT_SKIP,
                        group_size: int = DEFAULT_GROUP_SIZE, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """``quantize_model`` then ``save_quantized``, one decoder layer at a time: the same tensors, written into
    ``out_dir`` shard by shard, with one layer (in fp32) and one shard in memory whatever the model's size.

    ``skeleton``: the package's model built on the ``meta`` device (its modules, no weights), e.g.
    ``Qwen2ForCausalLM.quantize_checkpoint`` builds it. Float tensors are saved as ``save_quantized`` saves the
    fp32 model's: fp32, the untouched token tables in the checkpoint's 16-bit dtype (``narrow_tables``)."""
    src, out, skip = Path(deploy_package), Path(out_dir), tuple(skip)
    stats = check_request(scheme, stats, group_size, alpha)
    plan = plan_modules(skeleton, scheme, skip)
    config = quantization_config(scheme, plan, alpha=alpha, group_size=group_size, skip=skip)
    write_package_files(out, src, config, torch.float32)
    where, writer, narrow = checkpoint_shards(src), ShardWriter(out, max_shard_bytes), checkpoint_dtype(src)
    tied = bool(getattr(skeleton.config, "tie_word_embeddings", False))
    run = _calibration_run(skeleton, where, stats, narrow) if scheme in LAYERWISE_SCHEMES else None
    for name, module in skeleton.named_children():  # the base model's embeddings, layers and norm, then the head
        if name == "model":
            for child_name, child in module.named_children():
                if child_name == "layers":
                    for i, layer in enumerate(child):
                        writer.add(_quantized_layer(layer, i, where, scheme, plan, stats, alpha, group_size, run))
                else:
                    writer.add(_float_or_quantized(child, f"model.{child_name}", where, plan, group_size,
                                                   narrow=narrow))
        elif not (tied and name == "lm_head" and name not in plan):  # a tied float head is the embedding
            writer.add(_float_or_quantized(module, name, where, plan, group_size, tied, narrow))
    writer.close()
    return out


def _calibration_run(skeleton, where, stats, narrow) -> CalibrationRun:
    """AWQ's and GPTQ's calibration blocks embedded: the token table read as stored (no fp32 copy of it), its rows kept."""
    ids = calibration_ids(stats)
    table = read_tensors(where, ["model.embed_tokens.weight"], torch.float32, narrow)["model.embed_tokens.weight"]
    embedded = table[ids].float()  # (N, L, D)
    del table
    base = skeleton.model
    rotary = type(base.rotary_emb)(config=skeleton.config)  # its inverse frequencies are computed, not loaded
    return CalibrationRun(base, skeleton.config, rotary, embedded)


def _quantized_layer(layer, index, where, scheme, plan, stats, alpha, group_size, run) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{index}."
    layer = copy.deepcopy(layer)  # a meta copy; the skeleton's own layer stays as it is
    names = [prefix + n for n in layer.state_dict()]
    weights = read_tensors(where, names, torch.float32)
    layer.load_state_dict({n[len(prefix):]: t for n, t in weights.items()}, strict=True, assign=True)
    del weights
    quantize_layer(layer, index, scheme, plan, stats=stats, alpha=alpha, group_size=group_size, run=run)
    return {prefix + n: t for n, t in layer.state_dict().items()}


def _float_or_quantized(module, prefix, where, plan, group_size, tied=False, narrow=None) -> dict[str, torch.Tensor]:
    """A module outside the decoder layers (embeddings, final norm, head): read in fp32, quantized if the plan
    names it (a tied head is read from the embedding). A token table kept in float is read as the checkpoint
    stores it when that is the dtype it is saved in (``narrow_tables``): no fp32 copy of it is ever made."""
    module = copy.deepcopy(module)
    names = {prefix + "." + n: prefix + "." + n for n in module.state_dict()}
    if tied and prefix == "lm_head":
        names = {n: "model.embed_tokens.weight" for n in names}
    keep = narrow if prefix not in plan and any(n in TABLES for n in names) else None
    weights = read_tensors(where, set(names.values()), torch.float32, keep)
    module.load_state_dict({n[len(prefix) + 1:]: weights[src] for n, src in names.items()}, strict=True, assign=True)
    del weights
    if prefix in plan:
        holder = nn.Module()
        holder.add_module("m", module)
        replace_linears(holder, "", {"m": plan[prefix]}, group_size)
        module = holder.m
    return narrow_tables({f"{prefix}.{n}": t for n, t in module.state_dict().items()}, narrow)
