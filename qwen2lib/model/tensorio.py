"""Safetensors read and written one tensor at a time, so no stage holds a whole model to move its weights.

``TensorReader``: a read-only mapping {name: tensor} over a folder's shards. Each read opens the shard with
``safe_open`` (memory-mapped), copies the one tensor out and closes it again, so the mapping's pages leave the
process with it; ``rows`` reads only some rows of a table (an embedding) and ``group`` one decoder layer's tensors
in one opening. ``write_shards``: the safetensors format written by hand (8-byte header length, JSON header, the
bytes) from tensors produced on demand, in shards of at most ``max_shard_bytes`` with Hugging Face's index file,
so a checkpoint of any size is written with one tensor in memory.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
               torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8"}
MAX_SHARD_BYTES = 4 << 30


def header_of(path: Path) -> dict:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(length))


class TensorReader(Mapping):
    """{tensor name: tensor} over every ``*.safetensors`` in ``folder`` (or the index's shards), read lazily."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.where = {name: self.folder / shard for name, shard in weight_map.items()}
        else:
            self.where = {name: shard for shard in sorted(self.folder.glob("*.safetensors"))
                          for name in header_of(shard) if name != "__metadata__"}
        self._headers: dict[Path, dict] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise KeyError(name)
        with safe_open(str(self.where[name]), "pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def info(self, name: str) -> dict:
        """{"dtype", "shape", "data_offsets"} from the shard's header: no tensor bytes read."""
        shard = self.where[name]
        if shard not in self._headers:
            self._headers[shard] = header_of(shard)
        return self._headers[shard][name]

    def group(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Several tensors (one layer's), each shard opened once; cast to ``dtype`` one by one when given."""
        by_shard: dict[Path, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.where[name], []).append(name)
        out = {}
        for shard, shard_names in by_shard.items():
            with safe_open(str(shard), "pt") as f:
                for name in shard_names:
                    t = f.get_tensor(name)
                    out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def rows(self, name: str, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """table[ids] (ids of any shape) -> (*ids.shape, D), reading only the rows asked for."""
        unique, inverse = torch.unique(ids.flatten(), return_inverse=True)
        with safe_open(str(self.where[name]), "pt") as f:
            table = f.get_slice(name)
            picked = torch.stack([table[int(i) : int(i) + 1][0] for i in unique.tolist()]).to(dtype)  # (U, D)
        return picked[inverse].reshape(*ids.shape, -1)

    def row_blocks(self, name: str, block: int, dtype: torch.dtype = torch.float32) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, table[first : first + block]) over the whole table: a head read a block of rows at a time."""
        n = self.info(name)["shape"][0]
        with safe_open(str(self.where[name]), "pt") as f:
            table = f.get_slice(name)
            for start in range(0, n, block):
                yield start, table[start : start + block].to(dtype)


def _header_bytes(entries: dict) -> bytes:
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the tensor bytes start 8-aligned
    return struct.pack("<Q", len(raw)) + raw


def write_shards(folder: str | Path, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 produce: Callable[[str], Iterable[torch.Tensor]], max_shard_bytes: int = MAX_SHARD_BYTES,
                 metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write tensors {name: (shape, dtype)} in that order, each made by ``produce(name)`` as one or more chunks
    (flat pieces in order, of the tensor's dtype), into ``model.safetensors`` or, past ``max_shard_bytes``,
    ``model-0000i-of-0000n.safetensors`` plus the index. Returns the files written."""
    folder = Path(folder)
    shards: list[list[str]] = [[]]
    size = 0
    nbytes = {n: _numel(shape) * torch.empty((), dtype=dt).element_size() for n, (shape, dt) in specs.items()}
    for name in specs:
        if shards[-1] and size + nbytes[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    files = [folder / (SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
             for i in range(len(shards))]
    for path, names in zip(files, shards):
        entries, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
        for name in names:
            shape, dtype = specs[name]
            entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                             "data_offsets": [offset, offset + nbytes[name]]}
            offset += nbytes[name]
        with open(path, "wb") as fh:
            fh.write(_header_bytes(entries))
            for name in names:
                written = 0
                for chunk in produce(name):
                    data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
                    fh.write(data.data)
                    written += data.nbytes
                if written != nbytes[name]:
                    raise ValueError(f"{name}: produced {written} bytes, its shape and dtype need {nbytes[name]}")
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())},
                 "weight_map": {n: files[i].name for i, names in enumerate(shards) for n in names}}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        files.append(folder / INDEX_FILE)
    return files


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
