"""GGUF for llama.cpp, llama-cpp-python and ollama, written with the ``gguf`` package (llama.cpp's own writer).

What goes in, from a deploy package (notebook 01):

    metadata   general.architecture = qwen2 and the Qwen2 hyperparameters llama.cpp reads
               (``qwen2.block_count``, ``qwen2.embedding_length``, ... ``qwen2.rope.freq_base``,
               ``qwen2.attention.layer_norm_rms_epsilon``; YaRN / linear RoPE scaling when the config has it)
    tokenizer  ``tokenizer.ggml.model = gpt2`` (byte-level BPE) with ``pre = qwen2``, every id's token and type
               (normal, control for special added tokens, user-defined for the other added ones, unused for the
               padding ids past the real vocabulary), the merges, bos/eos/pad ids and the chat template
    tensors    HF names mapped by gguf's own table (``token_embd``, ``blk.N.attn_q``, ..., ``output_norm``,
               ``output``); 1-D tensors (norms, biases) stay F32, matrices are F32, F16, Q8_0 or Q4_0

Q4_0 files keep the output matrix (``output``, or ``token_embd`` when the embeddings are tied) at Q8_0, as
llama.cpp's own quantizer keeps it at a higher precision (Q6_K there; gguf-py has no Q6_K quantizer).
Matrices whose rows are not a whole number of 32-value blocks fall back to F16.

Tensors stream one at a time: the header is written from the weight files' metadata, then each tensor is read,
converted and appended, so memory holds one tensor, never the model. Reading a GGUF (the check that the file says
what llama.cpp needs, and a GGUF as a model source) is ``qwen2lib.model.gguf``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from ..errors import Qwen2LibError
from ..model.loading import check_safetensors
from ..model.model_config import shape_numbers
from ..model.bpe import QWEN_PATTERN
from ..model.tokenizer import has_tokenizer_files
from ..model.gguf import ARCH, ARCH_NAME, TENSOR_SUFFIXES

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
MATRIX_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
                "q4_0": gguf.GGMLQuantizationType.Q4_0}
OUTPUT_TYPE_FOR_Q4_0 = gguf.GGMLQuantizationType.Q8_0


class ExportError(Qwen2LibError, ValueError):
    """An export that cannot be written as asked (unknown format or type, a model the format cannot hold)."""


def check_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--type {gguf_type!r}: a GGUF holds one of {', '.join(GGUF_TYPES)}")
    return gguf_type


# ---- what a package holds ------------------------------------------------------------------------


def read_config(package: Path) -> dict:
    path = package / "config.json"
    if not path.is_file():
        raise ExportError(f"{package} has no config.json: export a deploy package (notebook 01, `qwen2lib patch`)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") != "qwen2":
        raise ExportError(f"{package}: model_type {config.get('model_type')!r}; this export writes qwen2 models only")
    if config.get("quantization_config"):
        raise ExportError(f"{package} is an int8 package: a GGUF is written from the float deploy package "
                          "(patched/), which llama.cpp quantizes its own way (--type q8_0 | q4_0)")
    return config


def iter_tensor_names(files: list[Path]) -> Iterator[tuple[Path, str]]:
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield path, name


def rope_scaling(config: dict) -> dict:
    return dict(config.get("rope_parameters") or config.get("rope_scaling") or {})


def rope_theta(config: dict) -> float:
    return float(rope_scaling(config).get("rope_theta", config.get("rope_theta", 10000.0)))


# ---- writing -------------------------------------------------------------------------------------


def add_hyperparameters(writer: gguf.GGUFWriter, config: dict, name: str, gguf_type: str) -> None:
    """The qwen2.* keys llama.cpp's loader reads, and the file type."""
    if config.get("use_sliding_window"):
        raise ExportError("the config enables sliding-window attention, which llama.cpp's qwen2 graph does not run")
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    s = shape_numbers(config)
    writer.add_embedding_length(s["H"])
    writer.add_block_count(s["L"])
    writer.add_feed_forward_length(s["I"])
    writer.add_head_count(s["n_h"])
    writer.add_head_count_kv(s["n_kv"])
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    rope = rope_scaling(config)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind != "default":
        raise ExportError(f"rope_type {kind!r}: the GGUF export writes default, linear and yarn RoPE only")
    writer.add_file_type(FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def vocab_entries(package: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """(token of each id, its gguf TokenType) for ids 0 .. vocab_size - 1, from the package's tokenizer.json."""
    data, path = tokenizer_json(package)
    check_qwen_pretokenizer(data, path)
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for token, i in data["model"]["vocab"].items():
        tokens[i], types[i] = token, int(gguf.TokenType.NORMAL)
    for added in data.get("added_tokens", []):
        i = added["id"]
        if i >= vocab_size:
            raise ExportError(f"{path}: added token {added['content']!r} has id {i} >= vocab_size {vocab_size}")
        tokens[i] = added["content"]
        types[i] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], types


def tokenizer_json(package: Path) -> tuple[dict, Path]:
    """The package's tokenizer as tokenizer.json data: the file itself, or the fast tokenizer transformers builds from
    vocab.json + merges.txt (the other Hugging Face layout)."""
    path = package / "tokenizer.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")), path
    if not (has_tokenizer_files(package) and (package / "tokenizer_config.json").is_file()):
        raise ExportError(f"{package} has no tokenizer (tokenizer.json, or vocab.json + merges.txt with "
                          "tokenizer_config.json): a GGUF carries its tokenizer; build the package from a checkpoint "
                          "with tokenizer files")
    fast = AutoTokenizer.from_pretrained(package)
    return json.loads(fast.backend_tokenizer.to_str()), package / "vocab.json"


def check_qwen_pretokenizer(data: dict, path: Path) -> None:
    """llama.cpp's ``pre = qwen2`` splits text with Qwen's regex: refuse a tokenizer that splits otherwise."""
    if data.get("model", {}).get("type") != "BPE":
        raise ExportError(f"{path}: a {data.get('model', {}).get('type')} tokenizer; Qwen2's is byte-level BPE")
    if QWEN_PATTERN not in json.dumps(data.get("pre_tokenizer"), ensure_ascii=False).replace("\\\\", "\\"):
        raise ExportError(f"{path}: the pre-tokenizer does not split with Qwen2's pattern, so llama.cpp's "
                          "qwen2 pre-tokenizer would tokenize differently; export a Qwen2 tokenizer")


def add_tokenizer(writer: gguf.GGUFWriter, package: Path, vocab_size: int) -> dict:
    """Tokens, types, merges, special ids and chat template; returns a summary for metrics.json."""
    tokens, types = vocab_entries(package, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(package, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:
        # Qwen2 prepends nothing; llama.cpp's BPE default would prepend bos (<|endoftext|>) to every prompt
        writer.add_add_bos_token(False)
    return {"tokens": len(tokens), "merges": len(special.merges), "special_ids": dict(special.special_token_ids),
            "chat_template": special.chat_template is not None,
            "control": types.count(int(gguf.TokenType.CONTROL)), "unused": types.count(int(gguf.TokenType.UNUSED))}


def tensor_plan(files: list[Path], config: dict, gguf_type: str) -> list[dict]:
    """One entry per tensor written: source file and name, gguf name, shape and ggml type."""
    name_map = gguf.get_tensor_name_map(ARCH, int(config["num_hidden_layers"]))
    tied = bool(config.get("tie_word_embeddings"))
    plan = []
    for path, hf_name in iter_tensor_names(files):
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the tied output from token_embd
        gguf_name = name_map.get_name(hf_name, try_suffixes=TENSOR_SUFFIXES)
        if gguf_name is None:
            raise ExportError(f"{path.name}: tensor {hf_name!r} has no qwen2 GGUF name")
        with safe_open(str(path), framework="pt") as f:
            shape = tuple(f.get_slice(hf_name).get_shape())
        plan.append({"file": path, "hf_name": hf_name, "name": gguf_name, "shape": shape,
                     "type": tensor_type(gguf_name, shape, gguf_type, tied)})
    return plan


def tensor_type(gguf_name: str, shape: tuple, gguf_type: str, tied: bool) -> gguf.GGMLQuantizationType:
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    qtype = MATRIX_TYPES[gguf_type]
    is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    if gguf_type == "q4_0" and is_output:
        qtype = OUTPUT_TYPE_FOR_Q4_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def encode_tensor(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def write_gguf(package: str | os.PathLike, path: str | os.PathLike, gguf_type: str = "q8_0",
               name: str | None = None) -> dict:
    """Write ``package`` (a deploy package or checkpoint folder, float weights) as one GGUF file at ``path``.

    Returns a summary (tensor types, tokenizer figures) for the stage's metrics.json.
    """
    package, path = Path(package), Path(path)
    check_type(gguf_type)
    config = read_config(package)
    plan = tensor_plan(check_safetensors(package), config, gguf_type)
    writer = gguf.GGUFWriter(None, ARCH_NAME)
    add_hyperparameters(writer, config, name or package.name, gguf_type)
    tokenizer = add_tokenizer(writer, package, int(config["vocab_size"]))
    for entry in plan:
        byte_shape = gguf.quant_shape_to_byte_shape(entry["shape"], entry["type"]) if entry["type"] not in (
            gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else entry["shape"]
        item = gguf.GGML_QUANT_SIZES[entry["type"]]
        nbytes = int(np.prod(entry["shape"])) // item[0] * item[1]
        dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(
            entry["type"], np.uint8)
        writer.add_tensor_info(entry["name"], byte_shape, np.dtype(dtype), nbytes, raw_dtype=entry["type"])
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for entry in plan:  # the same order as the tensor infos
            with safe_open(str(entry["file"]), framework="pt") as f:
                writer.write_tensor_data(encode_tensor(f.get_tensor(entry["hf_name"]), entry["type"]))
    finally:
        writer.close()
    types: dict[str, int] = {}
    for entry in plan:
        types[entry["type"].name] = types.get(entry["type"].name, 0) + 1
    return {"file": path.name, "bytes": path.stat().st_size, "type": gguf_type, "tensor_types": types,
            "tensors": len(plan), "tokenizer": tokenizer}


# ---- reading back --------------------------------------------------------------------------------
