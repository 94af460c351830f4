"""Prefill and decode speed on one machine, in one run: transformers fp32/bf16, torch dynamic int8, notebook 04's
ONNX graphs in onnxruntime, and llama.cpp on GGUFs of the same checkpoint.

    python benchmarks/decode_prefill.py --llama-cpp path/to/llama.cpp/build     # Qwen2-0.5B shape, random weights
    python benchmarks/decode_prefill.py --model tiny --prompt 128 --decode 32   # a quick look

Prefill: tokens/s over one ``--prompt``-token prompt (batch 1), logits of the last position only
(``logits_to_keep=1`` for transformers, ``graph.insert_slice`` for the graphs). Decode: tokens/s over
``--decode`` greedy steps after a ``--context``-token prompt (16: short; 512 shows what copying the KV cache each
step would cost), for each batch size, timed step by step with the KV cache (the prompt's prefill not counted).

llama.cpp rows: ``llama-batched-bench`` (llama.cpp's own tool, ``--llama-cpp`` names its build; see
``benchmarks/llamacpp.py`` for where it is looked for and how to build it) on ``qwen2lib export --format gguf``
files of the same checkpoint (``--gguf-types``: f32, q8_0, q4_0), the same prompt, decode length, batch sizes and
threads. Its decode steps feed random ids and read no logits; ours take the argmax in Python, so the Python
work per step counts against us. Without the tool the rows say "not built" and how to build it.

``--rounds`` rounds interleave every backend (each loaded, measured and released in turn; llama.cpp as a child
process); each figure is the backend's best round, so load from other processes on a shared machine disturbs all
rows alike. Each round also probes the memory bandwidth (STREAM-like: read = sum of a 1 GiB array, copy =
bytes read + written, on ``--threads`` threads); every row gets the bytes of weights one decode step streams (each
matrix read in full; a token table only gathered is not counted) and the rate at which batch-1 decode streams
them, beside the probed read bandwidth: the distance to the physical limit. Random weights: the speed is real,
the text is not. Compare rows of one run only: the printed tables are ratios to the peers of the same run.

Every run names what it ran on: the CPU and its instruction sets (``machine.py``), and each llama.cpp build (its
version line and CMake options, ``llamacpp.build_record``). ``--llama-cpp`` may be given once per build
(``--llama-cpp native=DIR --llama-cpp avx512=DIR``, see ``llamacpp.CONFIGURATIONS``): each figure is then compared
with the fastest build that ran it, and the table says which. When other processes took CPU time during the run
(``machine.LoadWatch``), the targets print UNRELIABLE instead of PASS / FAIL. The raw results (every round's rows,
the machine, the builds) are written as JSON beside the table (``--json``; default benchmarks/runs/).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp import BUILD_HINT, batched_bench, build_record, describe_build, find_tool, gguf_matmul_bytes  # noqa: E402
from machine import LoadWatch, cpu_record, describe_cpu, verdict  # noqa: E402
from tables import markdown  # noqa: E402
from qwen2lib import load_model  # noqa: E402
from qwen2lib.artifacts import default_workdir  # noqa: E402
from qwen2lib.compile.stage import ensure_compiled  # noqa: E402
from qwen2lib.deploy.schemes import INT4_SCHEMES  # noqa: E402
from qwen2lib.export.stage import ensure_exported, gguf_file  # noqa: E402
from qwen2lib.compile.manifest import GRAPH_FILE  # noqa: E402
from qwen2lib.serve.generation import OnnxBackend, torch_backend  # noqa: E402

GATHER_OPS = {"Gather", "GatherBlockQuantized"}
TARGETS = [  # (row, column, reference row, at least): the targets, printed PASS / FAIL
    ("graph int8", "decode b1 tok/s", "llama.cpp Q8_0", 1.1),
    ("graph int4", "decode b1 tok/s", "llama.cpp Q4_0", 1.1),
    ("graph int8", "decode b8 tok/s", "llama.cpp Q8_0", 1.5),
    ("graph int8", "decode b8 tok/s", "torch dynamic int8", 1.2),
    ("graph int4", "decode b8 tok/s", "llama.cpp Q4_0", 1.0),
]


def torch_weight_bytes(backend) -> int:
    """Every Linear's weight of a torch backend's model (the head included: tied or not it reads a whole table);
    float or packed int8."""
    total = 0
    for module in backend.model.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif hasattr(module, "weight") and callable(module.weight):  # torch.ao dynamic quantized Linear
            total += module.weight().numel()
    return total


def graph_matmul_bytes(path: Path) -> int:
    """Bytes of the initializers a decode step reads in full: all but those only gathered from (an untied
    embedding table); shape constants are counted too (negligible)."""
    model = onnx.load(str(path), load_external_data=False)
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    total = 0
    for t in model.graph.initializer:
        if users.get(t.name, set()) <= GATHER_OPS:
            continue
        external = {e.key: e.value for e in t.external_data}
        total += int(external["length"]) if "length" in external else len(onnx.numpy_helper.to_array(t).tobytes())
    return total


def memory_bandwidth(threads: int, mib: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Best-of GB/s of a read (sum of ``mib`` MiB) and a copy (half of it, read + write counted): arrays larger
    than the last-level cache (hundreds of MiB on current server CPUs), so the figures are DRAM's."""
    torch.set_num_threads(threads)
    a = torch.ones(mib * 2**20 // 4)
    half = a[: a.numel() // 2]
    b = torch.empty_like(half)
    best = {"read GB/s": 0.0, "copy GB/s": 0.0}
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best["read GB/s"] = max(best["read GB/s"], a.nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        b.copy_(half)
        best["copy GB/s"] = max(best["copy GB/s"], 2 * b.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def time_prefill(backend, prompt_len: int, vocab: int) -> float:
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, (1, prompt_len)))
    t0 = time.perf_counter()
    backend.prefill(ids, torch.ones_like(ids))
    return prompt_len / (time.perf_counter() - t0)


def time_decode(backend, batch: int, steps: int, vocab: int, context: int) -> float:
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, vocab, (batch, context)))
    logits, state = backend.prefill(ids, torch.ones_like(ids))
    for _ in range(2):  # warm-up steps, not timed
        logits, state = backend.decode(logits.argmax(-1, keepdim=True), state)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, state = backend.decode(logits.argmax(-1, keepdim=True), state)
    return batch * steps / (time.perf_counter() - t0)


def measure_python(make, weight_bytes, args, vocab) -> dict:
    """One of each measurement for one in-process generation backend (``qwen2lib.serve.generation``: what
    ``qwen2lib generate`` and the serving engine run); ``weight_bytes(backend)`` counts what a decode step reads."""
    backend = make()
    warm = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, (1, 32)))
    backend.prefill(warm, torch.ones_like(warm))  # warm-up: allocator, prepacking
    row = {"prefill tok/s": time_prefill(backend, args.prompt, vocab)}
    for b in args.batches:
        row[f"decode b{b} tok/s"] = time_decode(backend, b, args.decode, vocab, args.context)
    row["weights MB"] = weight_bytes(backend) / 1e6
    backend.close()
    del backend
    gc.collect()
    return row


def _bench_or_nan(tool: Path, gguf: Path, args, prompt: int, decode: int, batches: list[int]) -> dict[int, dict]:
    """``batched_bench`` over ``batches``; where the whole run fails (a build whose batched path dies, e.g. the
    native build's AMX tile kernel with SIGILL), each batch alone, and a failing one gets NaN speeds."""
    try:
        return batched_bench(tool, gguf, args.threads, prompt, decode, batches)
    except RuntimeError as e:
        if len(batches) == 1:
            print(f"[bench]   {tool.name} failed at batch {batches[0]}: {str(e).splitlines()[-1]}", flush=True)
            return {batches[0]: {"speed_pp": math.nan, "speed_tg": math.nan}}
    return {b: row for one in batches for b, row in _bench_or_nan(tool, gguf, args, prompt, decode, [one]).items()}


def measure_llamacpp(tool: Path, gguf: Path, args) -> dict:
    """The same measurements by ``llama-batched-bench``: a prefill run and a decode run over the batch sizes."""
    prefill = _bench_or_nan(tool, gguf, args, args.prompt, 1, [1])
    decode = _bench_or_nan(tool, gguf, args, args.context, args.decode, args.batches)
    row = {"prefill tok/s": prefill[1]["speed_pp"]}
    row.update({f"decode b{b} tok/s": decode[b]["speed_tg"] for b in args.batches})
    row["weights MB"] = gguf_matmul_bytes(gguf) / 1e6
    return row


def best_of(a: float, b: float) -> float:
    """The larger figure, a round that could not run (NaN) passed over."""
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)


def llama_builds(args) -> dict[str, Path | None]:
    """{build name: its llama-batched-bench or None}: ``--llama-cpp [NAME=]DIR`` as given, else the one found in
    $LLAMA_CPP_DIR or on PATH."""
    if not args.llama_cpp:
        return {"": find_tool("llama-batched-bench", None)}
    builds = {}
    for spec in args.llama_cpp:
        name, _, folder = spec.rpartition("=")
        builds[name or Path(folder).name] = find_tool("llama-batched-bench", folder)
    return builds


def best_peer(table, gguf_type: str, builds) -> tuple[dict, dict]:
    """The fastest build's figure per column for one GGUF type, and which build gave each (a build that cannot run
    a path has NaN there and is passed over)."""
    labels = [peer_label(gguf_type, name, builds) for name in builds]
    labels = [lab for lab in labels if lab in table.index]
    best, which = {}, {}
    for col in table.columns:
        values = table.loc[labels, col].dropna()
        if len(values):
            best[col], which[col] = values.max(), values.idxmax()
    return best, which


def peer_label(gguf_type: str, build: str, builds) -> str:
    return f"llama.cpp {gguf_type.upper()}" + (f" [{build}]" if len(builds) > 1 else "")


def compile_graphs(args, workdir: Path) -> dict[str, Path]:
    # Random weights make quality bounds meaningless (near-flat logits); the graphs' parity is still
    # measured and kept in their manifests. Last-position logits: the prefill a generator runs.
    overrides = {"graph.insert_slice": True, "verify.blocks": 2, "verify.max_kld_mean": None,
                 "verify.min_top1_agreement": None, "verify.max_ppl_ratio": None}
    configs = Path(__file__).resolve().parent.parent / "configs"
    variants = {  # label -> (shipped config, extra keys)
        "graph fp32": ("qwen2_fp32", {}),
        "graph int8": ("qwen2_int8", {}),  # the shipped int8 config
        "graph int8 per-block act": ("qwen2_int8", {"quantization": {"activations": "int8_per_block",
                                                                     "per_block_projections": []}}),
        "graph int8 per-tensor act": ("qwen2_int8", {"quantization": {"per_block_projections": []}}),
        # llama.cpp Q8_0's granularity (weights and activations per block of 32): the accurate int8 graph
        "graph int8 block32": ("qwen2_int8_block32", {}),
        # notebook 03's int4 package (the shipped config's GPTQ unless --int4-scheme), int8 head
        "graph int4": ("qwen2_int4", {} if args.int4_scheme == "gptq"
                       else {"quantization": {"from_scheme": args.int4_scheme}}),
    }
    graphs = {}
    for label, (base, extra) in variants.items():
        if label in args.skip:
            continue
        cfg = {"base": str(configs / f"{base}.yaml"), "name": "bench_" + label.replace(" ", "_"), **extra}
        print(f"[bench] compiling '{label}' (reused when already built) ...", flush=True)
        graphs[label] = ensure_compiled(args.model, args.weights, workdir, config=cfg, overrides=overrides)
    return graphs


def backends(args, workdir: Path) -> tuple[list, list[str]]:
    """[(label, measure() -> row)] in round order, and notes on rows that cannot run."""
    from qwen2lib.model.registry import resolve

    vocab = resolve(args.model).config["vocab_size"]
    graphs = compile_graphs(args, workdir)

    def hf(dtype):
        return lambda: torch_backend(load_model(args.model, weights=args.weights, dtype=dtype))

    def dynamic_int8():
        model = load_model(args.model, weights=args.weights, dtype="float32")
        return torch_backend(torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8))

    def graph(folder: Path, in_place: bool = True):
        return lambda: OnnxBackend.load(folder, threads=args.threads, in_place=in_place)

    def graph_bytes(folder: Path):
        return lambda backend: graph_matmul_bytes(folder / GRAPH_FILE)

    makers = [("transformers fp32", hf("float32"), torch_weight_bytes),
              ("transformers bf16", hf("bfloat16"), torch_weight_bytes),
              ("torch dynamic int8", dynamic_int8, torch_weight_bytes)]
    makers += [(label, graph(folder), graph_bytes(folder)) for label, folder in graphs.items()]
    if args.kv_copy_row and "graph int8" in graphs:  # the cache fed and a fresh concatenated copy taken back each step
        makers.append(("graph int8, KV copied per step", graph(graphs["graph int8"], in_place=False),
                       graph_bytes(graphs["graph int8"])))
    rows = [(label, lambda m=make, w=weights: measure_python(m, w, args, vocab))
            for label, make, weights in makers if label not in args.skip]
    notes, builds = [], llama_builds(args)
    for build, tool in builds.items():
        for gguf_type in args.gguf_types:
            label = peer_label(gguf_type, build, builds)
            if label in args.skip:
                continue
            if tool is None:
                notes.append(f"{label}: not built (llama-batched-bench not found in --llama-cpp, $LLAMA_CPP_DIR or "
                             f"PATH): {BUILD_HINT.format(tool='llama-batched-bench')}")
                continue
            path = gguf_file(ensure_exported(args.model, args.weights, workdir, format="gguf", variant=gguf_type,
                                             verify_blocks=args.gguf_verify_blocks))
            rows.append((label, lambda p=path, t=tool: measure_llamacpp(t, p, args)))
    return rows, notes


def parse_args(argv=None):
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
    p.add_argument("--skip", nargs="*", default=["graph int8 per-block act", "graph int8 per-tensor act"],
                   help="backends to leave out (labels as printed; default: the other int8 activation schemes)")
    p.add_argument("--kv-copy-row", action="store_true",
                   help="add the int8 graph decoding with a KV cache copied each step (what writing it in place saves)")
    p.add_argument("--llama-cpp", action="append", default=[], metavar="[NAME=]DIR",
                   help="a llama.cpp build folder holding bin/llama-batched-bench; give several (native=..., "
                        "avx512=...: benchmarks/llamacpp.py's CONFIGURATIONS) to compare each figure with the "
                        "fastest build that runs it")
    p.add_argument("--json", default=None,
                   help="where the raw results go (default benchmarks/runs/decode_prefill-<UTC time>.json)")
    p.add_argument("--gguf-types", nargs="*", default=["f32", "q8_0", "q4_0"], help="llama.cpp rows (GGUF types)")
    p.add_argument("--gguf-verify-blocks", type=int, default=2,
                   help="held-out blocks each GGUF export is checked on (0: unverified, for a quicker first run)")
    p.add_argument("--int4-scheme", default="gptq", choices=INT4_SCHEMES,
                   help="the int4 package the int4 graph is compiled from (the packed format, hence the speed, is "
                        "the same for all; w4a16 quantizes a 7B in minutes where GPTQ takes over an hour here)")
    return p.parse_args(argv)


def ratio_table(table, references: list[str]):
    """Each speed column divided by the same column of each reference row present (the README's table)."""
    import pandas as pd

    speed = [c for c in table.columns if c.endswith("tok/s")]
    out = pd.DataFrame(index=table.index)
    for ref in references:
        if ref in table.index:
            for col in speed:
                out[f"{col.removesuffix(' tok/s').removeprefix('decode ')} x {ref}"] = table[col] / table.loc[ref, col]
    return out


def check_targets(table, watch: LoadWatch | None = None) -> list[str]:
    """The issue's targets, PASS / FAIL, or UNRELIABLE when the machine was not the run's alone."""
    lines = []
    for row, col, ref, goal in TARGETS:
        if row in table.index and ref in table.index and col in table.columns:
            ratio = table.loc[row, col] / table.loc[ref, col]
            lines.append(f"{row} {col.removesuffix(' tok/s')} = {ratio:.2f}x {ref} (target >= {goal}x): "
                         f"{verdict(ratio >= goal, watch)}")
    return lines


def add_best_peers(table, args) -> list[str]:
    """With several llama.cpp builds: a "llama.cpp <TYPE>" row holding, per column, the fastest build's figure (the
    ratios and targets compare with it), and a line naming the build behind each column."""
    builds = llama_builds(args)
    if len(builds) < 2:
        return []
    lines = []
    for gguf_type in args.gguf_types:
        best, which = best_peer(table, gguf_type, builds)
        if best:
            label = f"llama.cpp {gguf_type.upper()}"
            for col, value in best.items():
                table.loc[label, col] = value
            lines.append(f"{label} = per column, the fastest build: "
                         + ", ".join(f"{c.removesuffix(' tok/s')} <- {w}" for c, w in which.items()
                                     if c.endswith("tok/s")))
    return lines


def write_raw(args, record: dict) -> Path:
    """The run's raw results as JSON, kept beside the printed table."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = Path(args.json) if args.json else Path(__file__).resolve().parent / "runs" / f"decode_prefill-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str))
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    cpu = cpu_record()
    print(f"[bench] CPU: {describe_cpu(cpu)}", flush=True)
    builds = {name: build_record(tool) for name, tool in llama_builds(args).items() if tool is not None}
    for name, record in builds.items():
        print(f"[bench] llama.cpp build {name or '(found)'}: {describe_build(record)}", flush=True)
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"[bench] WARNING: load average {load_before:.1f} before starting: other processes hold cores. "
              "OpenMP (torch) and llama.cpp (its threads meet at a spinning barrier after every op) with --threads "
              "equal to the core count collapse when a core is taken (each parallel region waits for the "
              "descheduled thread); their rows will be far too low. Run on an idle machine.", flush=True)
    warnings.filterwarnings("ignore", module="torch.ao")  # quantize_dynamic's deprecation notice
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir) if args.workdir else default_workdir(args.model)
    rows, notes = backends(args, workdir)
    # Rounds interleave the backends, so a burst of load from other processes hits one round of every
    # backend alike instead of all of one backend's figures. One backend is loaded at a time: idle
    # thread pools of the others (onnxruntime and OpenMP spin-wait) would steal the cores.
    best: dict[str, dict] = {}
    bandwidth: dict[str, float] = {}
    raw_rounds = []
    watch = LoadWatch().start()
    for r in range(args.rounds):
        probe = memory_bandwidth(args.threads)
        bandwidth = {k: max(v, bandwidth.get(k, 0.0)) for k, v in probe.items()}
        print(f"[bench] round {r + 1}/{args.rounds}: memory " + ", ".join(f"{k} {v:.1f}" for k, v in probe.items()),
              flush=True)
        raw_rounds.append({"memory": probe, "rows": {}})
        for label, measure in rows:
            t0 = time.perf_counter()
            row = measure()
            raw_rounds[-1]["rows"][label] = row
            print(f"[bench]   {label:28s} {', '.join(f'{k} {v:.1f}' for k, v in row.items())} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            best[label] = {k: best_of(v, best.get(label, {}).get(k, math.nan)) for k, v in row.items()}
    watch.stop()

    import pandas as pd

    table = pd.DataFrame.from_dict(best, orient="index")
    table.index.name = "backend"
    peers = add_best_peers(table, args)
    if "decode b1 tok/s" in table.columns:
        table["b1 weights GB/s"] = table["weights MB"] * table["decode b1 tok/s"] / 1e3
        table["b1 % of read bw"] = 100 * table["b1 weights GB/s"] / bandwidth["read GB/s"]
    print(f"\n{args.model} ({args.weights} weights), {args.threads} threads, prefill {args.prompt} tokens, "
          f"decode {args.decode} tokens after a {args.context}-token prompt, best of {args.rounds} interleaved "
          f"rounds; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; memory bandwidth (best probe) "
          + ", ".join(f"{k} {v:.1f}" for k, v in bandwidth.items()) + f"; CPU {describe_cpu(cpu)}")
    print(f"Machine during the run: {watch.why}: {'idle' if watch.reliable else 'BUSY, figures UNRELIABLE'}")
    for name, record in builds.items():
        print(f"llama.cpp {name or 'build'}: {describe_build(record)}")
    print(markdown(table.round(1)))
    for line in peers:
        print(line)
    ratios = ratio_table(table, ["llama.cpp Q8_0", "llama.cpp Q4_0", "torch dynamic int8"])
    if len(ratios.columns):
        print("\nRatios (each speed column over the reference row's, same run):")
        print(markdown(ratios.round(2)))
    for line in check_targets(table, watch) + notes:
        print(line)
    raw = write_raw(args, {"args": vars(args), "cpu": cpu, "llama_cpp_builds": builds, "load": watch.as_dict(),
                           "bandwidth": bandwidth, "rounds": raw_rounds,
                           "best": table.to_dict(orient="index"), "targets": check_targets(table, watch),
                           "notes": notes})
    print(f"raw results: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
