"""Long-context speed and memory in one run: prefill of long prompts and decode deep into the context, for the int8
graph with and without Dual Chunk Attention, the accurate int8 graph (qwen2_int8_block32.yaml), the fp32 graph,
transformers fp32 and llama.cpp Q8_0.

    python benchmarks/long_context.py                                   # Qwen2-0.5B shape, random weights, 2k/4k/8k
    python benchmarks/long_context.py --model tiny --rounds 1 --decode 16   # a quick look

For each length L of ``--lengths``, each backend prefills one L-token prompt (tokens/s; last-position logits) and
then decodes ``--decode`` greedy steps from it, one token at a time (ms per step at L tokens of context; two
warm-up steps first, not timed). llama.cpp runs the same through ``llama-batched-bench`` (one row of L prompt
tokens, then ``--decode`` steps; see ``benchmarks/llamacpp.py`` for where the tool is looked for and how to build
it) on a ``qwen2lib export --format gguf --type q8_0`` file of the same checkpoint; without the tool its row says
how to build it. The graphs are notebook 04's configs with the positions raised to cover the longest run; the DCA
graph is compiled from a deploy package whose config.json carries ``--dca CHUNK,LOCAL`` (``qwen2lib.model.long_context``,
``<workdir>/long_context/<settings>/``), with the plain int8 graph's int8 weights.

Memory, per backend and length: the peak resident set during that length's prefill and decode (the process's
high-water mark, reset before each length; llama.cpp: its child process's), the resident growth still held
afterwards with the cache alive, and the bytes of the KV cache object itself. The KV check compares the growth
from the shortest to the longest length with notebook 00's formula (``qwen2lib.scratch.architecture.kv_bytes_per_token``
in the backend's KV dtype): a backend that holds more than its cache (spare capacity, an allocator that keeps
attention scratch) shows it there.

``--rounds`` rounds interleave the backends (each in its own process, loaded, measured at every length and gone
before the next starts: its memory is its own, and no idle thread pool of another competes for the cores); speed is
each backend's best round, memory its last. Ratios are against llama.cpp Q8_0 at the same length (higher = faster).
Compare rows of one run only.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp import BUILD_HINT, build_record, describe_build, find_tool  # noqa: E402
from machine import LoadWatch, cpu_record, describe_cpu, verdict  # noqa: E402
from tables import markdown  # noqa: E402
from qwen2lib import load_model  # noqa: E402
from qwen2lib.scratch.architecture import kv_bytes_per_token  # noqa: E402
from qwen2lib.artifacts import default_workdir  # noqa: E402
from qwen2lib.compile.stage import ensure_compiled  # noqa: E402
from qwen2lib.deploy import ensure_patched  # noqa: E402
from qwen2lib.export.stage import ensure_exported, gguf_file  # noqa: E402
from qwen2lib.model.long_context import long_context_overrides, workdir_tag  # noqa: E402
from qwen2lib.quantize.stage import ensure_quantized  # noqa: E402
from qwen2lib.model.registry import resolve  # noqa: E402
from qwen2lib.serve.generation import OnnxBackend, torch_backend  # noqa: E402
from qwen2lib.stages.resident import reset_peak, status_bytes  # noqa: E402

REFERENCE = "llama.cpp Q8_0"
TARGETS = [(graph, kind, L) for graph in ("graph int8", "graph int8 block32")  # each >= 1.0x
           for kind, L in (("prefill", 4096), ("decode", 2048), ("decode", 8192))]
KV_DTYPES = {"graph int8": "float32", "graph int8 block32": "float32", "graph int8 DCA": "float32",
             "graph fp32": "float32", "transformers fp32": "float32",
             REFERENCE: "float16"}  # llama.cpp's default cache type is f16


# ---- resident memory -------------------------------------------------------------------------------

def kv_nbytes(state) -> int:
    """Bytes of a generation backend's KV cache: the graphs' KVState buffers (capacity included), or the
    transformers cache of a torch backend's (cache, attention mask) state."""
    if hasattr(state, "buffers"):
        return sum(k.nbytes + v.nbytes for k, v in state.buffers)
    cache, _ = state
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


# ---- in-process backends (qwen2lib.serve.generation's: what generate and serve run) ------------------------

def measure_lengths(backend, lengths: list[int], decode: int, vocab: int) -> dict[int, dict]:
    """{L: prefill tok/s, decode ms/step, peak / held resident MB, KV MB} for one loaded generation backend."""
    rng = np.random.default_rng(0)
    warm = torch.from_numpy(rng.integers(0, vocab, (1, 32)))
    backend.prefill(warm, torch.ones_like(warm))  # warm-up: allocator, prepacking
    gc.collect()
    out = {}
    for length in lengths:
        before = status_bytes("VmRSS")
        reset_peak()
        ids = torch.from_numpy(rng.integers(0, vocab, (1, length)))
        t0 = time.perf_counter()
        logits, state = backend.prefill(ids, torch.ones_like(ids))
        prefill_s = time.perf_counter() - t0
        for _ in range(2):  # warm-up steps (the graphs move the cache into growable buffers here)
            logits, state = backend.decode(logits.argmax(-1, keepdim=True), state)
        t0 = time.perf_counter()
        for _ in range(decode):
            logits, state = backend.decode(logits.argmax(-1, keepdim=True), state)
        step_s = (time.perf_counter() - t0) / decode
        out[length] = {"prefill tok/s": length / prefill_s, "decode ms": 1e3 * step_s,
                       "peak MB": (status_bytes("VmHWM") or 0) / 1e6,
                       "held MB": ((status_bytes("VmRSS") or 0) - (before or 0)) / 1e6,
                       "KV MB": kv_nbytes(state) / 1e6}
        del logits, state
        gc.collect()
    return out


def measure_python(label: str, folder: Path | None, args) -> dict[int, dict]:
    """One backend in a fresh process (its own resident memory, no idle thread pools of the others): this script
    with ``--worker``, which prints the per-length rows as json on its last line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", label, "--model", args.model,
               "--weights", args.weights, "--threads", str(args.threads), "--decode", str(args.decode),
               "--lengths", *map(str, args.lengths)] + (["--folder", str(folder)] if folder else [])
    code, text, _ = run_with_peak_rss(command, timeout_s=3600)
    if code != 0:
        raise RuntimeError(f"{label} failed ({code}):\n" + "\n".join(text.strip().splitlines()[-8:]))
    return {int(L): row for L, row in json.loads(text.strip().splitlines()[-1]).items()}


def worker(args) -> int:
    vocab = int(resolve(args.model).config["vocab_size"])
    if args.worker == "transformers fp32":
        backend = torch_backend(load_model(args.model, weights=args.weights, dtype="float32"))
    else:
        backend = OnnxBackend.load(Path(args.folder), threads=args.threads)
    print(json.dumps(measure_lengths(backend, args.lengths, args.decode, vocab)), flush=True)
    return 0


# ---- llama.cpp ------------------------------------------------------------------------------------------

def run_with_peak_rss(command: list[str], timeout_s: float) -> tuple[int, str, int]:
    """(exit code, stdout + stderr, the child's peak resident bytes) of one command. The peak is polled from
    /proc (VmHWM): a child's own rusage starts from its parent's high-water mark, inherited across fork."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        peak, deadline = 0, time.monotonic() + timeout_s
        while proc.poll() is None:
            peak = max(peak, status_bytes("VmHWM", str(proc.pid)) or 0)
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
            time.sleep(0.05)
        log.seek(0)
        return proc.returncode, log.read(), peak


def parse_batched_bench(text: str) -> dict:
    """The batch-1 jsonl row ``llama-batched-bench --output-format jsonl`` prints (speed_pp, speed_tg, ...)."""
    for line in text.splitlines():
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            if int(row["pl"]) == 1:
                return row
    raise ValueError("no batch-1 jsonl row in llama-batched-bench's output")


def measure_llamacpp(tool: Path, gguf: Path, lengths, decode: int, threads: int) -> dict[int, dict]:
    """Per length, one ``llama-batched-bench`` run: an L-token prompt, then ``decode`` steps (random ids, no
    sampling), in the same thread count and the ubatch batched_bench of decode_prefill.py uses."""
    out = {}
    for length in lengths:
        command = [str(tool), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-c", str(length + decode),
                   "-b", "2048", "-ub", "512", "-npp", str(length), "-ntg", str(decode), "-npl", "1",
                   "--output-format", "jsonl"]
        code, text, peak = run_with_peak_rss(command, timeout_s=3600)
        if code != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({code}):\n" + "\n".join(text.strip().splitlines()[-5:]))
        row = parse_batched_bench(text)
        out[length] = {"prefill tok/s": row["speed_pp"], "decode ms": 1e3 / row["speed_tg"], "peak MB": peak / 1e6,
                       "held MB": float("nan"), "KV MB": float("nan")}
    return out


# ---- building what runs -------------------------------------------------------------------------------

def graph_overrides(config: dict, lengths, decode: int) -> dict:
    """Compile overrides: last-position logits, positions for the longest run (the model's own limit, or the next
    power of two past the run when that is larger: ``tiny`` was built for 4,096), loose bounds (random weights)."""
    need = max(lengths) + decode + 8
    positions = max(int(config["max_position_embeddings"]), 1 << (need - 1).bit_length())
    return {"graph.insert_slice": True, "graph.max_sequence_length": positions, "verify.blocks": 2,
            "verify.max_kld_mean": None, "verify.min_top1_agreement": None, "verify.max_ppl_ratio": None}


def compile_graphs(args, workdir: Path, config: dict) -> dict[str, Path]:
    configs = Path(__file__).resolve().parent.parent / "configs"
    base = graph_overrides(config, args.lengths, args.decode)
    graphs = {}
    for label, name in (("graph int8", "qwen2_int8"), ("graph int8 block32", "qwen2_int8_block32"),
                        ("graph fp32", "qwen2_fp32")):
        if label not in args.skip:
            print(f"[long] compiling '{label}' (reused when already built) ...", flush=True)
            graphs[label] = ensure_compiled(args.model, args.weights, workdir, config=str(configs / f"{name}.yaml"),
                                            overrides={**base, "name": f"long_{name}"})
    if "graph int8 DCA" not in args.skip:
        dca = long_context_overrides(args.dca, None, config)
        dca_dir = workdir / "long_context" / workdir_tag(dca)
        print(f"[long] compiling 'graph int8 DCA' ({workdir_tag(dca)}) ...", flush=True)
        ensure_patched(args.model, args.weights, dca_dir, config_overrides=dca, verbose=False)
        int8 = ensure_quantized(args.model, args.weights, workdir, scheme="w8a16")  # DCA changes no weight
        graphs["graph int8 DCA"] = ensure_compiled(
            args.model, args.weights, dca_dir, config=str(configs / "qwen2_int8.yaml"),
            overrides={**base, "name": "long_qwen2_int8", "quantization.package": str(int8)})
    return graphs


def backends(args, workdir: Path, config: dict) -> tuple[list, list[str]]:
    """[(label, measure() -> {L: row})] in round order, and notes on rows that cannot run."""
    graphs = compile_graphs(args, workdir, config)
    if "transformers fp32" not in args.skip:
        graphs["transformers fp32"] = None
    rows = [(label, lambda lb=label, f=folder: measure_python(lb, f, args)) for label, folder in graphs.items()]
    notes = []
    if REFERENCE not in args.skip:
        tool = find_tool("llama-batched-bench", args.llama_cpp)
        if tool is None:
            notes.append(f"{REFERENCE}: not built (llama-batched-bench not found in --llama-cpp, $LLAMA_CPP_DIR or "
                         f"PATH): {BUILD_HINT.format(tool='llama-batched-bench')}")
        else:
            gguf = gguf_file(ensure_exported(args.model, args.weights, workdir, format="gguf", variant="q8_0"))
            # right after the int8 graph: the pair the targets compare runs closest in time (load drifts)
            rows.insert(1 if "graph int8" in graphs else 0,
                        (REFERENCE, lambda: measure_llamacpp(tool, gguf, args.lengths, args.decode, args.threads)))
    return rows, notes


# ---- tables --------------------------------------------------------------------------------------------

def speed_table(best: dict[str, dict[int, dict]], lengths) -> "pd.DataFrame":
    """One row per backend: prefill tok/s and decode ms/step per length, each with its ratio to llama.cpp Q8_0
    at the same length (as speed: > 1 is faster; NaN without the reference)."""
    import pandas as pd

    table = pd.DataFrame(index=list(best))
    ref = best.get(REFERENCE)
    for length in lengths:
        prefill = pd.Series({b: rows[length]["prefill tok/s"] for b, rows in best.items()})
        table[f"prefill {length} tok/s"] = prefill
        table[f"prefill {length} x ref"] = prefill / ref[length]["prefill tok/s"] if ref else float("nan")
    for length in lengths:
        step = pd.Series({b: rows[length]["decode ms"] for b, rows in best.items()})
        table[f"decode @{length} ms"] = step
        table[f"decode @{length} x ref"] = ref[length]["decode ms"] / step if ref else float("nan")
    table.index.name = "backend"
    return table


def memory_table(last: dict[str, dict[int, dict]], lengths) -> "pd.DataFrame":
    import pandas as pd

    table = pd.DataFrame(index=list(last))
    for key in ("peak MB", "held MB", "KV MB"):
        for length in lengths:
            table[f"{key.split()[0]} @{length} MB"] = pd.Series({b: rows[length][key] for b, rows in last.items()})
    table.index.name = "backend"
    return table


def kv_check(last: dict[str, dict[int, dict]], lengths, config: dict) -> "pd.DataFrame":
    """Growth from the shortest to the longest length against notebook 00's KV formula in each backend's KV dtype:
    the KV object's own bytes, the resident memory held with it, and (llama.cpp) the peak."""
    import pandas as pd

    lo, hi = min(lengths), max(lengths)
    rows = []
    for backend, per in last.items():
        dtype = KV_DTYPES.get(backend, "float32")
        formula = kv_bytes_per_token(config, dtype) * (hi - lo) / 1e6
        row = {"backend": backend, "KV dtype": dtype, "formula MB": formula}
        for key in ("KV MB", "held MB", "peak MB"):
            growth = per[hi][key] - per[lo][key]
            row[f"{key.split()[0]} growth MB"] = growth
            row[f"{key.split()[0]} / formula"] = growth / formula
        rows.append(row)
    return pd.DataFrame(rows).set_index("backend")


def check_targets(table, watch: LoadWatch | None = None) -> list[str]:
    """PASS / FAIL per target, UNRELIABLE when other processes took CPU during the run."""
    lines = []
    for backend, kind, length in TARGETS:
        column = f"prefill {length} x ref" if kind == "prefill" else f"decode @{length} x ref"
        if backend in table.index and column in table.columns and not np.isnan(table.loc[backend, column]):
            ratio = table.loc[backend, column]
            lines.append(f"{backend} {kind} {'of' if kind == 'prefill' else 'at'} {length} tokens = {ratio:.2f}x "
                         f"{REFERENCE} (target >= 1.0x): {verdict(ratio >= 1.0, watch)}")
    return lines


# ---- main ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Qwen2-0.5B")
    p.add_argument("--weights", default="random", choices=("auto", "random"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192],
                   help="prompt lengths: prefill of each, then decode at that context")
    p.add_argument("--decode", type=int, default=32, help="timed decode steps after each prompt")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; speed: best round, memory: last")
    p.add_argument("--dca", default="2048,256", metavar="CHUNK,LOCAL",
                   help="the DCA graph's chunk_size,local_size (its cost does not depend on them)")
    p.add_argument("--workdir", default=None, help="where the graphs are compiled (default runs/<model>)")
    p.add_argument("--skip", nargs="*", default=[], help="backends to leave out (labels as printed)")
    p.add_argument("--llama-cpp", default=None, help="llama.cpp build folder holding bin/llama-batched-bench")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one backend's measurement (a child process)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.lengths = sorted(set(args.lengths))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    load_before = os.getloadavg()[0]
    workdir = Path(args.workdir) if args.workdir else default_workdir(args.model)
    config = resolve(args.model).config
    rows, notes = backends(args, workdir, config)
    best: dict[str, dict[int, dict]] = {}
    last: dict[str, dict[int, dict]] = {}
    watch = LoadWatch().start()
    for r in range(args.rounds):
        print(f"[long] round {r + 1}/{args.rounds}", flush=True)
        for label, measure in rows:
            t0 = time.perf_counter()
            per = measure()
            print(f"[long]   {label:18s} " + "; ".join(
                f"{L}: prefill {v['prefill tok/s']:.0f} tok/s, decode {v['decode ms']:.1f} ms, peak {v['peak MB']:.0f} MB"
                for L, v in per.items()) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            last[label] = per
            best[label] = {L: {**v, "prefill tok/s": max(v["prefill tok/s"], best.get(label, {}).get(L, v)["prefill tok/s"]),
                               "decode ms": min(v["decode ms"], best.get(label, {}).get(L, v)["decode ms"])}
                           for L, v in per.items()}
    watch.stop()
    tool = find_tool("llama-batched-bench", args.llama_cpp)
    print(f"\nCPU {describe_cpu(cpu_record())}; llama.cpp "
          f"{describe_build(build_record(tool)) if tool else 'not built'}; machine during the run: {watch.why}")
    print(f"{args.model} ({args.weights} weights), {args.threads} threads, prompts of {', '.join(map(str, args.lengths))} "
          f"tokens then {args.decode} decode steps; best of {args.rounds} interleaved rounds; DCA {args.dca}; "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after\n")
    table = speed_table(best, args.lengths)
    print(markdown(table.round(2)))
    print("\nResident memory (MB; peak during each length, held = growth kept with the cache alive, KV = the cache "
          "object's bytes), last round:\n")
    print(markdown(memory_table(last, args.lengths).round(0)))
    if len(args.lengths) > 1:
        print(f"\nKV cache growth {min(args.lengths)} -> {max(args.lengths)} tokens against notebook 00's formula:\n")
        print(markdown(kv_check(last, args.lengths, config).round(2)))
    print()
    for line in check_targets(table, watch) + notes:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
