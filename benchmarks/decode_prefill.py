"""Prefill and decode speed on one machine, in one run: transformers fp32/bf16, torch dynamic int8,
and notebook 04's fp32 and int8 ONNX graphs in onnxruntime.

    python benchmarks/decode_prefill.py                      # Qwen2-0.5B shape, random weights, 2 threads
    python benchmarks/decode_prefill.py --model tiny --prompt 128 --decode 32   # a quick look

Prefill: tokens/s over one ``--prompt``-token prompt (batch 1), logits of the last position only
(``logits_to_keep=1`` for transformers, ``graph.last_position_logits`` for the graphs). Decode:
tokens/s over ``--decode`` greedy steps after a ``--context``-token prompt (16: short; 512 shows what
copying the KV cache each step would cost), for each batch size, timed step by step with the KV
cache (the prompt's prefill not counted). ``--rounds`` rounds interleave the
backends (each loaded, measured and released in turn); each figure is the backend's best round, so
load from other processes on a shared machine disturbs all rows alike. Random weights: the speed is real, the text
is not. Compare rows of one run only.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen2lib import load_model  # noqa: E402
from qwen2lib.artifacts import default_workdir  # noqa: E402
from qwen2lib.compile import ensure_compiled  # noqa: E402
from qwen2lib.graph import OnnxCausalLM  # noqa: E402


class TorchRunner:
    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def prefill(self, ids):
        out = self.model(input_ids=torch.as_tensor(ids), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float().numpy(), out.cache

    @torch.no_grad()
    def decode(self, next_ids, cache):
        out = self.model(input_ids=torch.as_tensor(next_ids), cache=cache, use_cache=True)
        return out.logits[:, -1].float().numpy(), out.cache


class GraphRunner:
    def __init__(self, lm: OnnxCausalLM, copy_kv: bool = False):
        self.lm = lm
        self.copy_kv = copy_kv  # feed the cache and take a fresh concatenated copy back each step (the plain way)

    def prefill(self, ids):
        logits, state = self.lm.prefill(ids)
        return logits[:, -1], state

    def decode(self, next_ids, state):
        logits, state = self.lm.decode(next_ids, state, in_place=not self.copy_kv)
        return logits[:, -1], state


def time_prefill(runner, prompt_len: int, vocab: int) -> float:
    ids = np.random.default_rng(0).integers(0, vocab, (1, prompt_len))
    t0 = time.perf_counter()
    runner.prefill(ids)
    return prompt_len / (time.perf_counter() - t0)


def time_decode(runner, batch: int, steps: int, vocab: int, context: int) -> float:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab, (batch, context))
    logits, state = runner.prefill(ids)
    for _ in range(2):  # warm-up steps, not timed
        logits, state = runner.decode(logits.argmax(-1)[:, None], state)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, state = runner.decode(logits.argmax(-1)[:, None], state)
    return batch * steps / (time.perf_counter() - t0)


def measure_round(label, runner, args, vocab) -> dict:
    """One of each measurement for one backend."""
    t0 = time.perf_counter()
    row = {"prefill tok/s": time_prefill(runner, args.prompt, vocab)}
    for b in args.batches:
        row[f"decode b{b} tok/s"] = time_decode(runner, b, args.decode, vocab, args.context)
    print(f"[bench]   {label:26s} {', '.join(f'{k} {v:.1f}' for k, v in row.items())} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Qwen2-0.5B")
    p.add_argument("--weights", default="random", choices=("auto", "random"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=512, help="prefill prompt length")
    p.add_argument("--decode", type=int, default=128, help="timed decode steps")
    p.add_argument("--context", type=int, default=16, help="prompt tokens per row before the timed decode steps")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds over all backends; each figure is its best round (least disturbed)")
    p.add_argument("--workdir", default=None, help="where the graphs are compiled (default runs/<model>)")
    p.add_argument("--skip", nargs="*", default=[], help="backends to leave out (labels as printed)")
    p.add_argument("--kv-copy-row", action="store_true",
                   help="add the int8 graph decoding with a KV cache copied each step (what writing it in place saves)")
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"[bench] WARNING: load average {load_before:.1f} before starting: other processes hold cores. "
              "OpenMP (torch) with --threads equal to the core count collapses when a core is taken "
              "(each parallel region waits for the descheduled thread); the torch rows will be far too low. "
              "Run on an idle machine.", flush=True)
    warnings.filterwarnings("ignore", module="torch.ao")  # quantize_dynamic's deprecation notice
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir) if args.workdir else default_workdir(args.model)
    # Random weights make quality bounds meaningless (near-flat logits); the graphs' parity is still
    # measured and kept in their manifests. Last-position logits: the prefill a generator runs.
    overrides = {"graph.last_position_logits": True, "verify.blocks": 2, "verify.max_kld_mean": None,
                 "verify.min_top1_agreement": None, "verify.max_ppl_ratio": None}
    configs = Path(__file__).resolve().parent.parent / "configs"
    variants = {  # label -> (shipped config, extra keys)
        "graph fp32": ("qwen2_fp32", {}),
        "graph int8": ("qwen2_int8", {}),  # the shipped int8 config: activations per call, down_proj's per block
        "graph int8 per-block act": ("qwen2_int8", {"quantization": {"activations": "int8_per_block",
                                                                     "per_block_projections": []}}),
        "graph int8 per-tensor act": ("qwen2_int8", {"quantization": {"per_block_projections": []}}),
    }
    graphs = {}
    for label, (base, extra) in variants.items():
        if label in args.skip:
            continue
        cfg = {"base": str(configs / f"{base}.yaml"), "name": "bench_" + label.replace(" ", "_"), **extra}
        print(f"[bench] compiling '{label}' (reused when already built) ...", flush=True)
        graphs[label] = ensure_compiled(args.model, args.weights, workdir, config=cfg, overrides=overrides)

    def hf(dtype):
        return lambda: TorchRunner(load_model(args.model, weights=args.weights, dtype=dtype))

    def dynamic_int8():
        model = load_model(args.model, weights=args.weights, dtype="float32")
        return TorchRunner(torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8))

    def graph(label, copy_kv=False):
        return lambda: GraphRunner(OnnxCausalLM.load(graphs[label], threads=args.threads), copy_kv)

    from qwen2lib.registry import resolve

    vocab = resolve(args.model).config["vocab_size"]
    backends = [("transformers fp32", hf("float32")), ("transformers bf16", hf("bfloat16")),
                ("torch dynamic int8", dynamic_int8)] + [(label, graph(label)) for label in graphs]
    if args.kv_copy_row and "graph int8" in graphs:
        backends.append(("graph int8, KV copied per step", graph("graph int8", copy_kv=True)))
    # Rounds interleave the backends, so a burst of load from other processes hits one round of every
    # backend alike instead of all of one backend's figures. One backend is loaded at a time: idle
    # thread pools of the others (onnxruntime and OpenMP spin-wait) would steal the cores.
    best: dict[str, dict] = {}
    for r in range(args.rounds):
        print(f"[bench] round {r + 1}/{args.rounds}", flush=True)
        for label, make in backends:
            if label in args.skip:
                continue
            runner = make()
            runner.prefill(np.random.default_rng(0).integers(0, vocab, (1, 32)))  # warm-up: allocator, prepacking
            row = measure_round(label, runner, args, vocab)
            best[label] = {k: max(v, best.get(label, {}).get(k, 0.0)) for k, v in row.items()}
            del runner
            gc.collect()
    rows = [{"backend": label, **row} for label, row in best.items()]

    import pandas as pd

    table = pd.DataFrame(rows).set_index("backend")
    for ref_label, short in (("transformers fp32", "fp32"), ("torch dynamic int8", "dyn int8")):
        if ref_label in table.index:
            for col in [c for c in table.columns if c.startswith(("prefill", "decode")) and c.endswith("tok/s")]:
                table[f"{col.split()[0] if col.startswith('prefill') else col.split()[1]} x {short}"] = \
                    table[col] / table.loc[ref_label, col]
    print(f"\n{args.model} ({args.weights} weights), {args.threads} threads, prefill {args.prompt} tokens, "
          f"decode {args.decode} tokens after a {args.context}-token prompt, best of {args.rounds} interleaved "
          f"rounds; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(table.round(2).to_markdown() if _has_tabulate() else table.round(2).to_string())
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
