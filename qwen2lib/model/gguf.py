"""A GGUF file (llama.cpp, ollama, LM Studio) as a model source: read it, and turn it into the Hugging Face
checkpoint every stage starts from.

    --model path/to/model.gguf      (or a folder holding exactly one .gguf and no config.json)

becomes ``<cache>/gguf/<file stem>-<key>/``: config.json (``architectures: ["Qwen2ForCausalLM"]``) and
generation_config.json from the file's ``qwen2.*`` metadata, bf16 safetensors dequantized with the ``gguf``
package one tensor (a block of rows for the big tables) at a time, so a 7B file converts in a few GB, and the
tokenizer (tokenizer.json, tokenizer_config.json with the chat template) from its ``tokenizer.ggml.*`` metadata.
The key hashes the file's path, size and modification time and this converter's source: a changed file or
converter builds a new folder. The values are the file's (a Q4_K_M file gives Q4_K / Q6_K-rounded weights), so
scores land below the original checkpoint's; ``gguf_source.json`` in the folder says what the file held.

The reader parts (``config_from_gguf``, ``GGUFTensors``, ``gguf_tokenizer``, ``load_gguf_model``) are also what the
GGUF export (``qwen2lib.export.gguf``) reads its own files back with.
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import gguf
import numpy as np
import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from ..artifacts import atomic_dir
from ..errors import Qwen2LibError
from ..paths import cache_root
from .bpe import qwen_byte_level_bpe
from .tensorio import write_shards

ARCH = gguf.MODEL_ARCH.QWEN2
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]
TENSOR_SUFFIXES = (".weight", ".bias")
CHECKPOINT_DTYPE = torch.bfloat16
ROW_BLOCK = 8192  # rows of a table dequantized at once: 8192 x 3584 fp32 is 117 MB, the whole 7B table 2.2 GB
SOURCE_RECORD = "gguf_source.json"
CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings")


class GGUFError(Qwen2LibError, ValueError):
    """A GGUF file that is not a whole qwen2 model with its tokenizer, or that describes another model."""


# ---- reading ------------------------------------------------------------------------------------


def as_reader(gguf_file) -> gguf.GGUFReader:
    """A path or an open reader (parsing a 150k-token vocabulary takes seconds: read a file once). A file that is
    not a whole GGUF is refused in one line."""
    if isinstance(gguf_file, gguf.GGUFReader):
        return gguf_file
    try:
        return gguf.GGUFReader(str(gguf_file))
    except (ValueError, IndexError, KeyError, OSError, TypeError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise GGUFError(f"{gguf_file}: no such file") from exc
        raise GGUFError(f"{gguf_file} is not a whole GGUF file ({type(exc).__name__}: {exc}); "
                        "download or copy it again") from exc


def path_of(reader: gguf.GGUFReader) -> str:
    return getattr(reader.data, "filename", None) or "the GGUF file"


def field_value(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _required(reader: gguf.GGUFReader, key: str):
    value = field_value(reader, key)
    if value is None:
        raise GGUFError(f"{path_of(reader)} has no {key} in its metadata: it is not a complete qwen2 GGUF")
    return value


def check_architecture(reader: gguf.GGUFReader) -> None:
    arch = field_value(reader, "general.architecture")
    if arch != ARCH_NAME:
        raise GGUFError(f"{path_of(reader)}: general.architecture is {arch!r}; qwen2lib reads {ARCH_NAME!r} GGUFs "
                        "only (Qwen1.5, Qwen2, Qwen2.5 and their fine-tunes)")


def config_from_gguf(reader: gguf.GGUFReader) -> Qwen2Config:
    """A transformers Qwen2Config from the GGUF's metadata alone."""
    check_architecture(reader)
    key = lambda k: f"{ARCH_NAME}.{k}"  # noqa: E731
    names = {t.name for t in reader.tensors}
    rope = {"rope_type": "default", "rope_theta": float(_required(reader, key("rope.freq_base")))}
    scaling = field_value(reader, key("rope.scaling.type"))
    if scaling in ("yarn", "linear"):
        rope.update(rope_type=scaling, factor=float(_required(reader, key("rope.scaling.factor"))))
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = int(_required(reader, key("rope.scaling.original_context_length")))
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = len(tokens) if tokens is not None else (int(embedding.shape[-1]) if embedding is not None else 0)
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=int(_required(reader, key("embedding_length"))),
        intermediate_size=int(_required(reader, key("feed_forward_length"))),
        num_hidden_layers=int(_required(reader, key("block_count"))),
        num_attention_heads=int(_required(reader, key("attention.head_count"))),
        num_key_value_heads=int(_required(reader, key("attention.head_count_kv"))),
        max_position_embeddings=int(_required(reader, key("context_length"))),
        rms_norm_eps=float(_required(reader, key("attention.layer_norm_rms_epsilon"))),
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


def _describes_the_same_model(ours: Qwen2Config, config, path: str) -> None:
    fields = {f: (getattr(ours, f), getattr(config, f)) for f in CONFIG_FIELDS}
    fields["rope_theta"] = ((ours.rope_parameters or {}).get("rope_theta"),
                            (config.rope_parameters or {}).get("rope_theta"))
    # GGUF stores its floats in 32 bits: 1e-6 reads back as 9.99999997e-07
    show = lambda v: f"{v:g}" if isinstance(v, float) else v  # noqa: E731
    differ = [f"{f} {show(a)} (package: {show(b)})" for f, (a, b) in fields.items()
              if not (a == b or isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-6))]
    if differ:
        raise GGUFError(f"{path}: its metadata describes another model: {', '.join(differ)}")


class GGUFTensors(Mapping):
    """{HF tensor name: fp32 tensor} of a GGUF file, dequantized one tensor (or some rows of one) at a time: the
    ``tensorio.TensorReader`` interface, so ``LayerwiseModel`` streams the file's model a layer at a time.

    ``config`` is the model's: the file's metadata must describe the same model (read from the metadata alone,
    as llama.cpp reads it) and hold every tensor the model has, or GGUFError says what differs."""

    def __init__(self, gguf_file, config):
        self.reader = as_reader(gguf_file)
        self.path = path = path_of(self.reader)
        _describes_the_same_model(config_from_gguf(self.reader), config, path)
        names = hf_names(config.num_hidden_layers)
        unknown = [t.name for t in self.reader.tensors if t.name not in names]
        if unknown:
            raise GGUFError(f"{path}: tensor {unknown[0]!r} is not part of a qwen2 model")
        self.tensors = {names[t.name]: t for t in self.reader.tensors}
        expected = set(names.values()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
        missing = sorted(expected - set(self.tensors))
        if missing:
            raise GGUFError(f"{path}: no tensor for {', '.join(missing[:3])}")

    def __getitem__(self, name: str) -> torch.Tensor:
        return dequantized(self.tensors[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """The HF shape (rows, columns) of a tensor, from the file's header alone."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape))

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
        data = np.asarray(self.tensors[name].data)
        if data.ndim == 1:  # a 1-D tensor (norm, bias) is one block
            yield 0, self[name].to(dtype)
            return
        for start in range(0, data.shape[0], block):
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
            raise GGUFError(f"{tensors.path}: {tensors.tensors[name].name} has shape {tuple(value.shape)}, the "
                            f"config implies {tuple(state[name].shape)}")
        state[name].copy_(value)
    return model


def gguf_tokenizer(gguf_file):
    """A ``tokenizers.Tokenizer`` rebuilt from the GGUF's vocab alone (tokens, types, merges) with Qwen2's
    pre-tokenizer: what llama.cpp's ``gpt2``/``qwen2`` tokenizer has to work from."""
    reader = as_reader(gguf_file)
    path = path_of(reader)
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    types = field_value(reader, "tokenizer.ggml.token_type")
    merges = field_value(reader, "tokenizer.ggml.merges")
    if tokens is None or types is None or merges is None:
        raise GGUFError(f"{path} carries no tokenizer (tokenizer.ggml.tokens / token_type / merges): qwen2lib needs "
                        "the GGUF's own vocabulary; convert the model again with llama.cpp's convert_hf_to_gguf.py")
    model = field_value(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {model!r}; a Qwen2 GGUF has the byte-level BPE 'gpt2'")
    normal = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == int(gguf.TokenType.NORMAL)}
    added = [(i, t, kind == int(gguf.TokenType.CONTROL)) for i, (t, kind) in enumerate(zip(tokens, types))
             if kind in (int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED))]
    try:
        return qwen_byte_level_bpe(normal, [tuple(m.split(" ", 1)) for m in merges], added)
    except ValueError as exc:
        raise GGUFError(f"{path}: {exc}") from exc


# ---- a GGUF as the checkpoint every stage starts from ----------------------------------------------


def gguf_source(model: str | os.PathLike) -> Path | None:
    """The GGUF file ``model`` names (a ``.gguf`` file, or a folder with exactly one and no config.json), else
    None (a registry name, hub id or Hugging Face folder)."""
    path = Path(str(model).strip()).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.resolve()
    if path.suffix.lower() == ".gguf" and not path.exists():
        raise GGUFError(f"{path}: no such file")
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(found) > 1:
            raise GGUFError(f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found[:3])}): name one")
        if found:
            return found[0].resolve()
    return None


def checkpoint_key(path: Path) -> str:
    """The file (path, size, modification time) and this converter's source: what the converted folder is of."""
    stat = path.stat()
    h = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for source in (Path(__file__), Path(__file__).with_name("bpe.py"), Path(__file__).with_name("tensorio.py")):
        h.update(source.read_bytes())
    return h.hexdigest()[:12]


def gguf_checkpoint(model: str | os.PathLike) -> Path:
    """The Hugging Face checkpoint folder converted from a GGUF file, built once into the cache."""
    path = gguf_source(model)
    if path is None:
        raise GGUFError(f"{model} is not a .gguf file, nor a folder holding one")
    folder = cache_root() / "gguf" / f"{path.stem}-{checkpoint_key(path)}"
    if (folder / SOURCE_RECORD).is_file():
        return folder
    reader = as_reader(path)
    config = config_from_gguf(reader)
    tensors = GGUFTensors(reader, config)
    tokenizer = hf_tokenizer(reader, config)  # refuses a file without its tokenizer before any weight is written
    print(f"[checkpoint] converting {path.name} ({path.stat().st_size / 1e9:.2f} GB, "
          f"{config.num_hidden_layers} layers) into {folder}", file=sys.stderr, flush=True)
    with atomic_dir(folder) as tmp:
        write_config(config, tmp)
        tokenizer.save_pretrained(tmp)
        write_weights(tensors, config, tmp)
        record = {"file": str(path), "bytes": path.stat().st_size, "name": field_value(reader, "general.name"),
                  "tensor_types": dict(collections.Counter(t.tensor_type.name for t in reader.tensors)),
                  "dtype": "bfloat16",
                  "note": "weights are the file's dequantized values, not the original checkpoint's"}
        (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for stale in folder.parent.glob(f"{path.stem}-*"):  # the same file converted by an older key
        if stale != folder and stale.is_dir() and (stale / SOURCE_RECORD).is_file():
            record = json.loads((stale / SOURCE_RECORD).read_text(encoding="utf-8"))
            if record.get("file") == str(path):
                _remove_tree(stale)
    return folder


def _remove_tree(folder: Path) -> None:
    for child in sorted(folder.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    folder.rmdir()


def write_config(config: Qwen2Config, folder: Path) -> None:
    data = config.to_dict()
    data.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
                max_window_layers=config.num_hidden_layers)
    data["torch_dtype"] = "bfloat16"
    data.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    eos = [config.eos_token_id] + [i for i in (config.bos_token_id,) if i is not None and i != config.eos_token_id]
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos if len(eos) > 1 else eos[0],
                     pad_token_id=config.bos_token_id, do_sample=False).save_pretrained(folder)


def hf_tokenizer(reader: gguf.GGUFReader, config: Qwen2Config) -> PreTrainedTokenizerFast:
    """The transformers tokenizer of the file: its vocabulary, special ids and chat template."""
    backend = gguf_tokenizer(reader)
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    token = lambda key: tokens[i] if (i := field_value(reader, key)) is not None and i < len(tokens) else None  # noqa: E731
    types = field_value(reader, "tokenizer.ggml.token_type")
    control = [t for t, kind in zip(tokens, types) if kind == int(gguf.TokenType.CONTROL)]
    eos = token("tokenizer.ggml.eos_token_id")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, pad_token=token("tokenizer.ggml.padding_token_id") or eos,
        bos_token=None, unk_token=None, additional_special_tokens=[t for t in control if t != eos],
        chat_template=field_value(reader, "tokenizer.chat_template"), model_max_length=config.max_position_embeddings,
        clean_up_tokenization_spaces=False, split_special_tokens=False)


def write_weights(tensors: GGUFTensors, config: Qwen2Config, folder: Path) -> None:
    """bf16 safetensors in Qwen2ForCausalLM's order, a tensor (a block of a table's rows) at a time."""
    with torch.device("meta"):  # names and shapes only: a 7B model in fp32 would need 28 GB
        expected = {n: tuple(p.shape) for n, p in Qwen2ForCausalLM(config).state_dict().items()}
    specs = {}
    for name, shape in expected.items():
        if name not in tensors:
            continue  # lm_head of a tied model
        if tensors.shape(name) != shape:
            raise GGUFError(f"{tensors.path}: {tensors.tensors[name].name} has shape {tensors.shape(name)}, the "
                            f"metadata implies {shape}")
        specs[name] = (shape, CHECKPOINT_DTYPE)

    def produce(name: str) -> Iterator[torch.Tensor]:
        for _, block in tensors.row_blocks(name, ROW_BLOCK, CHECKPOINT_DTYPE):
            yield block

    write_shards(folder, specs, produce)
