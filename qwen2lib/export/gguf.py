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
converted and appended, so memory holds one tensor, never the model. ``load_gguf_model`` goes the other way:
a transformers ``Qwen2ForCausalLM`` rebuilt from the file alone (its metadata and dequantized tensors), the
check that the file says what llama.cpp needs; ``gguf_tokenizer`` rebuilds the tokenizer from the file's vocab.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import gguf
import numpy as np
import torch
from safetensors import safe_open
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import Qwen2Config, Qwen2ForCausalLM

from ..errors import Qwen2LibError
from ..model.loading import check_safetensors
from ..model.model_config import shape_numbers
from ..model.tokenizer import QWEN_PATTERN

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
ARCH = gguf.MODEL_ARCH.QWEN2
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
MATRIX_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
                "q4_0": gguf.GGMLQuantizationType.Q4_0}
OUTPUT_TYPE_FOR_Q4_0 = gguf.GGMLQuantizationType.Q8_0
TENSOR_SUFFIXES = (".weight", ".bias")


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
    path = package / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{package} has no tokenizer.json: a GGUF carries its tokenizer; build the package from "
                          "a checkpoint with tokenizer files")
    data = json.loads(path.read_text(encoding="utf-8"))
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


def as_reader(gguf_file) -> gguf.GGUFReader:
    """A path or an open reader (parsing a 150k-token vocabulary takes seconds: read a file once)."""
    return gguf_file if isinstance(gguf_file, gguf.GGUFReader) else gguf.GGUFReader(str(gguf_file))


def field_value(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def config_from_gguf(reader: gguf.GGUFReader):
    """A transformers Qwen2Config from the GGUF's metadata alone."""
    arch = field_value(reader, "general.architecture")
    if arch != ARCH_NAME:
        raise ExportError(f"general.architecture is {arch!r}, not {ARCH_NAME!r}")
    key = lambda k: f"{ARCH_NAME}.{k}"  # noqa: E731
    names = {t.name for t in reader.tensors}
    rope = {"rope_type": "default", "rope_theta": float(field_value(reader, key("rope.freq_base")))}
    scaling = field_value(reader, key("rope.scaling.type"))
    if scaling in ("yarn", "linear"):
        rope.update(rope_type=scaling, factor=float(field_value(reader, key("rope.scaling.factor"))))
        if scaling == "yarn":
            original = field_value(reader, key("rope.scaling.original_context_length"))
            rope["original_max_position_embeddings"] = int(original)
    return Qwen2Config(
        vocab_size=len(field_value(reader, "tokenizer.ggml.tokens")),
        hidden_size=int(field_value(reader, key("embedding_length"))),
        intermediate_size=int(field_value(reader, key("feed_forward_length"))),
        num_hidden_layers=int(field_value(reader, key("block_count"))),
        num_attention_heads=int(field_value(reader, key("attention.head_count"))),
        num_key_value_heads=int(field_value(reader, key("attention.head_count_kv"))),
        max_position_embeddings=int(field_value(reader, key("context_length"))),
        rms_norm_eps=float(field_value(reader, key("attention.layer_norm_rms_epsilon"))),
        rope_parameters=rope, tie_word_embeddings="output.weight" not in names,
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
    )


def hf_names(num_layers: int) -> dict[str, str]:
    """{gguf tensor name: HF name} for a Qwen2ForCausalLM with ``num_layers`` layers."""
    name_map = gguf.get_tensor_name_map(ARCH, num_layers)
    tiny = Qwen2ForCausalLM(Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_attention_heads=2,
                                        num_key_value_heads=1, num_hidden_layers=num_layers,
                                        tie_word_embeddings=False))
    return {name_map.get_name(n, try_suffixes=TENSOR_SUFFIXES): n for n in tiny.state_dict()}


def dequantized(tensor) -> torch.Tensor:
    """A reader tensor as fp32 torch, in the HF (rows, columns) order."""
    data = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: F32/F16 data is the file's read-only map


CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings")


class GGUFTensors(Mapping):
    """{HF tensor name: fp32 tensor} of a GGUF file, dequantized one tensor (or some rows of one) at a time: the
    ``tensorio.TensorReader`` interface, so ``LayerwiseModel`` streams the file's model a layer at a time.

    ``config`` is the package's: the file's metadata must describe the same model (read from the metadata alone,
    as llama.cpp reads it) and hold every tensor the model has, or ExportError says what differs."""

    def __init__(self, gguf_file, config):
        self.reader = as_reader(gguf_file)
        self.path = path = self.reader.data.filename if hasattr(self.reader.data, "filename") else "the GGUF file"
        ours = config_from_gguf(self.reader)
        fields = {f: (getattr(ours, f), getattr(config, f)) for f in CONFIG_FIELDS}
        fields["rope_theta"] = ((ours.rope_parameters or {}).get("rope_theta"),
                                (config.rope_parameters or {}).get("rope_theta"))
        # GGUF stores its floats in 32 bits: 1e-6 reads back as 9.99999997e-07
        show = lambda v: f"{v:g}" if isinstance(v, float) else v  # noqa: E731
        differ = [f"{f} {show(a)} (package: {show(b)})" for f, (a, b) in fields.items()
                  if not (a == b or isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-6))]
        if differ:
            raise ExportError(f"{path}: its metadata describes another model: {', '.join(differ)}")
        names = hf_names(config.num_hidden_layers)
        unknown = [t.name for t in self.reader.tensors if t.name not in names]
        if unknown:
            raise ExportError(f"{path}: tensor {unknown[0]!r} is not part of a qwen2 model")
        self.tensors = {names[t.name]: t for t in self.reader.tensors}
        expected = set(names.values()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
        missing = sorted(expected - set(self.tensors))
        if missing:
            raise ExportError(f"{path}: no tensor for {', '.join(missing[:3])}")

    def __getitem__(self, name: str) -> torch.Tensor:
        return dequantized(self.tensors[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def group(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {n: self[n] if dtype is None else self[n].to(dtype) for n in names}

    def _rows(self, name: str, index) -> torch.Tensor:
        """Rows of a table, dequantized from those rows' blocks alone (a row holds whole blocks)."""
        tensor = self.tensors[name]
        data = gguf.quants.dequantize(np.asarray(tensor.data)[index], tensor.tensor_type)
        return torch.from_numpy(np.array(data, dtype=np.float32))

    def rows(self, name: str, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """table[ids] (ids of any shape) -> (*ids.shape, D), dequantizing only the rows asked for."""
        unique, inverse = torch.unique(ids.flatten(), return_inverse=True)
        return self._rows(name, unique.numpy())[inverse].reshape(*ids.shape, -1).to(dtype)

    def row_blocks(self, name: str, block: int, dtype: torch.dtype = torch.float32) -> Iterator[tuple[int, torch.Tensor]]:
        n = np.asarray(self.tensors[name].data).shape[0]
        for start in range(0, n, block):
            yield start, self._rows(name, slice(start, start + block)).to(dtype)


@torch.no_grad()
def load_gguf_model(gguf_file, dtype: torch.dtype = torch.float32):
    """A transformers ``Qwen2ForCausalLM`` (eval) built from the GGUF file (a path or a ``GGUFReader``) alone:
    config from its metadata, weights dequantized one tensor at a time."""
    reader = as_reader(gguf_file)
    config = config_from_gguf(reader)
    tensors = GGUFTensors(reader, config)  # every tensor named and present
    model = Qwen2ForCausalLM(config).to(dtype).eval()
    state = model.state_dict()
    for name in tensors:
        value = tensors[name]
        if tuple(value.shape) != tuple(state[name].shape):
            raise ExportError(f"{tensors.path}: {tensors.tensors[name].name} has shape {tuple(value.shape)}, the "
                              f"config implies {tuple(state[name].shape)}")
        state[name].copy_(value)
    return model


def gguf_tokenizer(gguf_file):
    """A ``tokenizers.Tokenizer`` rebuilt from the GGUF's vocab alone (tokens, types, merges) with Qwen2's
    pre-tokenizer: what llama.cpp's ``gpt2``/``qwen2`` tokenizer has to work from."""
    reader = as_reader(gguf_file)
    path = reader.data.filename if hasattr(reader.data, "filename") else "the GGUF file"
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    types = field_value(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field_value(reader, "tokenizer.ggml.merges")]
    normal = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == int(gguf.TokenType.NORMAL)}
    tokenizer = Tokenizer(models.BPE(vocab=normal, merges=merges, ignore_merges=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    added = [(i, t, kind) for i, (t, kind) in enumerate(zip(tokens, types))
             if kind in (int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED))]
    for i, token, kind in added:
        if tokenizer.add_tokens([AddedToken(token, special=kind == int(gguf.TokenType.CONTROL), normalized=False)]) \
                and tokenizer.token_to_id(token) != i:
            raise ExportError(f"{path}: added token {token!r} would take id {tokenizer.token_to_id(token)}, not {i}")
    return tokenizer
