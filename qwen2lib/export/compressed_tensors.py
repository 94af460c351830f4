"""The int8 package (notebook 03) in the compressed-tensors layout that vLLM and SGLang serve.

``config.json`` carries ``quantization_config`` with ``quant_method: compressed-tensors`` and one config group
per kind of Linear the package holds:

    W8A16 (per channel)   weights int8, symmetric, strategy channel; no activation quantization;
                          format ``pack-quantized``: ``X.weight_packed`` int32 (N, K/4, four int8 values
                          offset by 128 per word, lowest byte first), ``X.weight_shape`` [N, K] and
                          ``X.weight_scale`` (N, 1): the layout of vLLM's W8A16 (Marlin) kernels
    W8A8 (SmoothQuant)    the same weights plus ``input_activations`` int8, symmetric, strategy token, dynamic;
                          format ``int-quantized``: ``X.weight`` int8 (N, K) and ``X.weight_scale`` (N, 1)

A SmoothQuant package has both (q/k/v/gate/up W8A8, o/down W8A16), so its top-level format is
``mixed-precision`` and each group names its own. The smoothing factors are already folded into the norms'
weights, so those are written as the package holds them. Targets are ``re:`` patterns by Linear
(``re:.*\\.self_attn\\.q_proj$``) when every layer quantizes that Linear the same way, else the modules' full names;
Linears kept in float (lm_head) are listed under ``ignore``.

The int8 values and scales are the package's own (``qwen2lib.deploy.quantizer``): nothing is quantized again. Float tensors
(embeddings, norms, biases) are written in ``dtype`` (bfloat16 by default: vLLM's quantized kernels take
16-bit activations and the config's dtype is the one it serves in); scales stay fp32. The tensors stream one
at a time into shards of at most ``shard_bytes``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from ..artifacts import MARKER
from ..deploy.quantized_package import ShardWriter
from ..errors import Qwen2LibError
from ..model.loading import check_safetensors
from ..quantize.stage import QUANT_METHOD, is_skipped

CT_FORMAT_W8A16 = "pack-quantized"
CT_FORMAT_W8A8 = "int-quantized"
FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHARD_BYTES = 4 << 30
INDEX_FILE = "model.safetensors.index.json"
# The package's config keys that describe qwen2lib's own loading, not the model: an engine must not see them.
PACKAGE_ONLY_KEYS = ("auto_map", "_attn_implementation", "insert_slice", "quantization_config", "torch_dtype")
# Files of the package an engine needs (tokenizer, chat template, generation defaults); not its Python code.
COPIED_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
NOT_COPIED = ("config.json", "metrics.json", "patches.json", INDEX_FILE, MARKER)


class CompressedTensorsError(Qwen2LibError, ValueError):
    """An int8 package that cannot be written in the compressed-tensors layout."""


def weight_args() -> dict:
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
            "dynamic": False, "actorder": None, "observer": "minmax"}


def token_activation_args() -> dict:
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "group_size": None,
            "dynamic": True, "actorder": None, "observer": None}


KINDS = {  # the package's module kind -> (compressed-tensors format, input_activations)
    "w8a16": (CT_FORMAT_W8A16, None),
    "w8a8": (CT_FORMAT_W8A8, token_activation_args),
}


def read_int8_config(package: Path) -> dict:
    path = package / "config.json"
    if not path.is_file():
        raise CompressedTensorsError(f"{package} has no config.json: export an int8 package (notebook 03, "
                                     "`qwen2lib quantize`)")
    config = json.loads(path.read_text(encoding="utf-8"))
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != QUANT_METHOD:
        raise CompressedTensorsError(f"{package} is not a qwen2lib int8 package (quant_method "
                                     f"{quant.get('quant_method')!r}): run `qwen2lib quantize` first")
    unknown = sorted({k for k in quant["modules"].values() if k not in KINDS})
    if unknown:
        raise CompressedTensorsError(f"{package}: module kind(s) {', '.join(unknown)} have no compressed-tensors "
                                     f"mapping here (known: {', '.join(KINDS)})")
    return config


def targets_for(names: list[str], kinds: dict[str, str]) -> list[str]:
    """``re:`` patterns by Linear (the part after ``layers.N.``) when every layer gives it the same kind as
    ``names``; otherwise the full names."""
    by_leaf = defaultdict(set)
    for name, kind in kinds.items():
        by_leaf[re.sub(r"^.*?layers\.\d+\.", "", name)].add(kind)
    kind = kinds[names[0]]
    leaves = sorted({re.sub(r"^.*?layers\.\d+\.", "", n) for n in names})
    if all(by_leaf[leaf] == {kind} and "layers." in n for leaf in leaves for n in names):
        return ["re:.*\\." + re.escape(leaf) + "$" for leaf in leaves]
    return sorted(names)


def ct_quantization_config(modules: dict[str, str], linear_names: list[str]) -> dict:
    """The ``quantization_config`` for the package's {module: kind} map; ``linear_names``: every Linear."""
    groups, formats = {}, set()
    for i, kind in enumerate(sorted(set(modules.values()))):
        names = [n for n, k in modules.items() if k == kind]
        fmt, activations = KINDS[kind]
        formats.add(fmt)
        groups[f"group_{i}"] = {"targets": targets_for(names, modules), "weights": weight_args(),
                                "input_activations": activations() if activations else None,
                                "output_activations": None, "format": fmt}
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": groups,
            "ignore": sorted(n for n in linear_names if n not in modules), "kv_cache_scheme": None,
            "sparsity_config": {}, "global_compression_ratio": None}


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) -> int32 (N, ceil(K / 4)): value + 128 in each byte, element 0 in the lowest byte."""
    n, k = q.shape
    unsigned = (q.to(torch.int16) + 128).to(torch.uint8)
    if k % 4:
        unsigned = torch.nn.functional.pad(unsigned, (0, 4 - k % 4))  # zero bits, as compressed-tensors pads
    words = unsigned.reshape(n, -1, 4).to(torch.int64)
    packed = words[..., 0] | words[..., 1] << 8 | words[..., 2] << 16 | words[..., 3] << 24
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same bits, as int32


def converted_tensors(name: str, f, modules: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The export's tensors for one tensor of the int8 package (none for a scale: it goes with its weight)."""
    tensor = f.get_tensor(name)
    module, _, leaf = name.rpartition(".")
    if module in modules and leaf == "weight_scale":
        return {}
    if module in modules and leaf == "weight":
        scale = f.get_tensor(f"{module}.weight_scale").float().reshape(-1, 1)
        if KINDS[modules[module]][0] == CT_FORMAT_W8A16:
            return {f"{module}.weight_packed": pack_int8(tensor), f"{module}.weight_scale": scale,
                    f"{module}.weight_shape": torch.tensor(tuple(tensor.shape), dtype=torch.int64)}
        return {f"{module}.weight": tensor.contiguous(), f"{module}.weight_scale": scale}
    return {name: tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor}


def write_compressed_tensors(package: str | os.PathLike, out: str | os.PathLike, dtype: str = "bfloat16",
                             shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the int8 ``package`` into the folder ``out`` (existing, empty) in the compressed-tensors layout.

    Returns a summary (quantization_config, shards, bytes) for the stage's metrics.json.
    """
    package, out = Path(package), Path(out)
    if dtype not in FLOAT_DTYPES:
        raise CompressedTensorsError(f"dtype {dtype!r}: one of {', '.join(FLOAT_DTYPES)}")
    config = read_int8_config(package)
    modules = dict(config["quantization_config"]["modules"])
    skip = tuple(config["quantization_config"].get("skip", []))
    writer = ShardWriter(out, shard_bytes, metadata={"format": "pt"})
    linear_names = set(modules)  # and the Linears the package kept in float: the engine must leave them so
    for path in check_safetensors(package):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                writer.add(converted_tensors(name, f, modules, FLOAT_DTYPES[dtype]))
                module, _, leaf = name.rpartition(".")
                if leaf == "weight" and len(f.get_slice(name).get_shape()) == 2 and is_skipped(module, skip):
                    linear_names.add(module)
    shards = writer.close()
    if config.get("tie_word_embeddings") and is_skipped("lm_head", skip):
        linear_names.add("lm_head")  # tied: no tensor of its own, still a Linear the engine keeps in float
    quant = ct_quantization_config(modules, sorted(linear_names))
    export_config = {k: v for k, v in config.items() if k not in PACKAGE_ONLY_KEYS}
    export_config.update(architectures=["Qwen2ForCausalLM"], dtype=dtype, quantization_config=quant)
    (out / "config.json").write_text(json.dumps(export_config, indent=2) + "\n", encoding="utf-8")
    for f in package.iterdir():
        if f.is_file() and not f.is_symlink() and f.suffix in COPIED_SUFFIXES and f.name not in NOT_COPIED:
            shutil.copy2(f, out / f.name)
    return {"quantization_config": quant, "shards": shards, "dtype": dtype,
            "bytes": sum((out / s).stat().st_size for s in shards)}
