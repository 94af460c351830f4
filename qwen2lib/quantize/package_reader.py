"""Read notebook 03's quantized package back, lazily, for the graph builder: the reader beside the stage that writes it.

    floats, quantized = read_quantized_package("runs/tiny/quantized/w8a16")
    quantized["model.layers.0.mlp.down_proj.weight"]   # (int8 (N, K), fp32 scales (N, 1)) or an Int4Weight

It reads exactly what the deploy package's quantizer writes (``qwen2lib.deploy.quantizer``: the ``Int8Linear`` and
``Int4Linear`` buffers ``weight``, ``weight_scale`` and, for int4, ``weight_zero_point``; the group size from
``config.json``'s ``quantization_config``) and refuses anything else in one line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
import torch

from ..deploy.quantizer import QuantizationError, unpack_int4
from ..model.tensorio import TensorReader

SCALE, ZERO_POINT = "weight_scale", "weight_zero_point"  # the quantized Linears' buffers besides ``weight``


class Int4Weight(NamedTuple):
    """One Linear's int4 weight from notebook 03's int4 package (``quantizer.quantize_int4``)."""

    q: np.ndarray  # uint8 (N, K) in 0..15
    scales: np.ndarray  # fp32 (N, groups)
    zero_points: np.ndarray  # uint8 (N, groups)
    group_size: int


class QuantizedWeights(Mapping):
    """{"<linear>.weight": (int8 (N, K), fp32 scales (N, 1)) or Int4Weight} of notebook 03's package, read lazily."""

    def __init__(self, reader: TensorReader, int8: list[str], int4: dict[str, int]):
        self.reader, self.int8, self.int4 = reader, int8, int4  # int4: weight name -> its group size

    def __getitem__(self, name: str) -> tuple[np.ndarray, np.ndarray] | Int4Weight:
        stem = name[: -len(".weight")]
        q, scale = self.reader[name], self.reader[f"{stem}.{SCALE}"].float()
        if name in self.int4:  # uint8, two 4-bit values per byte; Qwen2's inputs (hidden, intermediate) are even
            zero = self.reader[f"{stem}.{ZERO_POINT}"].numpy()
            return Int4Weight(unpack_int4(q, 2 * q.shape[1]).numpy(), scale.numpy(), zero, self.int4[name])
        return q.numpy(), scale.numpy().reshape(q.shape[0], -1)

    def __iter__(self):
        return iter(self.int8 + list(self.int4))

    def __len__(self) -> int:
        return len(self.int8) + len(self.int4)


class _LazyTensors(Mapping):
    """Some tensors of a reader, by name, read when asked for."""

    def __init__(self, reader: TensorReader, names: list[str]):
        self.reader, self.names = reader, set(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.reader[name]

    def __iter__(self):
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)


def read_quantized_package(folder: str | Path) -> tuple[Mapping[str, torch.Tensor], QuantizedWeights]:
    """Notebook 03's package -> (its float tensors, its quantized weights), from the headers: tensors are read when
    the graph builder asks for them. Float tensors (norms changed by SmoothQuant or AWQ, unquantized Linears)
    replace the checkpoint's."""
    folder = Path(folder)
    reader = TensorReader(folder)
    int8, int4, floats = [], {}, []
    for name in reader:
        dtype, stem = reader.info(name)["dtype"], name.removesuffix(".weight")
        if name.endswith((f".{SCALE}", f".{ZERO_POINT}")):
            continue
        if dtype in ("F32", "F16", "BF16"):
            floats.append(name)
            continue
        if dtype not in ("I8", "U8"):
            continue
        if not name.endswith(".weight") or f"{stem}.{SCALE}" not in reader:
            raise QuantizationError(f"{folder}: {dtype} tensor {name} is not an X.weight with its X.{SCALE}: not a "
                                    "package qwen2lib's quantizer wrote; quantize again (notebook 03)")
        if dtype == "I8":
            int8.append(name)
        elif f"{stem}.{ZERO_POINT}" in reader:
            groups = reader.info(f"{stem}.{SCALE}")["shape"][1]
            int4[name] = _group_size(folder, 2 * reader.info(name)["shape"][1], groups)
        else:
            raise QuantizationError(f"{folder}: uint8 tensor {name} has no {stem}.{ZERO_POINT}: not an int4 weight "
                                    "qwen2lib's quantizer wrote; quantize again (notebook 03)")
    if not int8 and not int4:
        raise QuantizationError(f"{folder} holds no int8 or int4 weights: is it notebook 03's quantized package?")
    return _LazyTensors(reader, floats), QuantizedWeights(reader, int8, int4)


def _group_size(folder: Path, K: int, groups: int) -> int:
    recorded = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("quantization_config", {})
    size = recorded.get("group_size") or K // groups
    if -(-K // size) != groups:
        raise QuantizationError(f"{folder}: {groups} int4 groups do not fit {K} inputs in groups of {size}")
    return int(size)
