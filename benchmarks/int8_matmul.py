"""One Linear's matmul, each way the int8 package could run it, timed (CPU): why ``Int8Linear`` never dequantises.

    python benchmarks/int8_matmul.py                      # Qwen2-0.5B's MLP shape, 896 x 4864, 1 and 512 tokens
    python benchmarks/int8_matmul.py --shape 1536 8960    # Qwen2.5-1.5B's

Columns: fp32 ``F.linear``; "dequantise + fp32" (the obvious int8 Linear: W back to fp32 on every call, which moves
more memory than the fp32 matmul it replaces); W8A16 (``aten._weight_int8pack_mm``: bf16 activations times int8
weights inside the kernel, what ``qwen2lib.deploy.quantizer.Int8Linear`` runs for few rows); W8A8 (per-token int8
activations, ``torch._int_mm`` int8 x int8 -> int32, SmoothQuant's path). Medians of ``--repeats`` calls at one
torch thread by default: on a shared machine a multi-threaded single-token call mostly measures how long the
scheduler takes to wake the second thread. Compare columns within one row; the machine's load is printed with it.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Iterable

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2lib.deploy.quantizer import Int8Linear, dequantize_weight

# What the table is for: at one token the int8 kernel must beat dequantising (it reads a quarter of the bytes).
CLAIM = ("W8A16 int8pack (bf16 x)", "dequantise + fp32")


def median_ms(fn, repeats: int) -> float:
    for _ in range(2):  # warm-up: first calls pay for allocation and kernel selection
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


@torch.no_grad()
def matmul_timings(in_features: int = 896, out_features: int = 4864, tokens: Iterable[int] = (1, 512),
                   repeats: int = 10, seed: int = 0, threads: int | None = 1) -> pd.DataFrame:
    """Median ms per call of each path at each token count; ``threads=None`` keeps torch's setting."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(out_features, in_features, generator=g) / in_features**0.5
        lin = nn.Linear(in_features, out_features, bias=False)
        lin.weight.copy_(w)
        w8a16, w8a8 = Int8Linear.from_linear(lin, "bf16"), Int8Linear.from_linear(lin, "int8")
        rows = []
        for t in tokens:
            x = torch.randn(t, in_features, generator=g)
            rows.append({
                "tokens": t,
                "fp32 F.linear": median_ms(lambda: F.linear(x, w), repeats),
                "dequantise + fp32": median_ms(lambda: F.linear(x, dequantize_weight(w8a16.weight, w8a16.weight_scale)),
                                               repeats),
                CLAIM[0]: median_ms(lambda: w8a16(x), repeats),
                "W8A8 _int_mm (per-token x)": median_ms(lambda: w8a8(x), repeats),
            })
        return pd.DataFrame(rows).set_index("tokens")
    finally:
        torch.set_num_threads(previous)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs=2, type=int, default=(896, 4864), metavar=("IN", "OUT"))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 512])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    table = matmul_timings(*args.shape, tokens=args.tokens, repeats=args.repeats, threads=args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"load average {load:.1f} before / {os.getloadavg()[0]:.1f} after; median ms per call, "
          f"shape {args.shape[0]} x {args.shape[1]}\n")
    print(table.round(3).to_string())
    one = table.loc[min(args.tokens)]
    verdict = "holds" if one[CLAIM[0]] < one[CLAIM[1]] else "does NOT hold"
    print(f"\nat {min(args.tokens)} token(s): {CLAIM[0]} < {CLAIM[1]} {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
