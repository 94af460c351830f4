"""Our server (int8 graph, continuous batching) against llama.cpp's ``llama-server`` on the same checkpoint, one run.

    python benchmarks/serve_vs_llamacpp.py --llama-server /path/to/llama-server \\
        --convert /path/to/llama.cpp/convert_hf_to_gguf.py          # or --gguf model-q8_0.gguf
    python benchmarks/serve_vs_llamacpp.py --model tiny --weights auto --gguf tiny-q8_0.gguf   # a quick look
    python benchmarks/serve_vs_llamacpp.py --dataset ShareGPT_V3_unfiltered_cleaned_split.json

The default model is the Qwen2-0.5B shape with the project's random checkpoint, as in ``decode_prefill.py``: the
smallest size people deploy, where a prompt's prefill is matrix products as it is at every real size. On ``tiny``
(hidden size 128) attention is most of a prefill and the comparison says more about attention kernels than
about serving.

``llama-server`` is built from the llama.cpp sources vendored in the llama-cpp-python source package
(``pip download llama-cpp-python --no-binary :all:``, then ``cmake -B build && cmake --build build --target
llama-server`` in ``vendor/llama.cpp``); its GGUF is the same checkpoint converted by llama.cpp's
``convert_hf_to_gguf.py --outtype q8_0`` (gguf-py from the same tree; it also imports ``sentencepiece``, so have
that importable, e.g. on PYTHONPATH) unless ``--gguf`` names one.

Both servers run as child processes on 127.0.0.1 (free ports) for the whole run, with the same slot count
(our ``--max-batch``, llama.cpp's ``-np``, continuous batching in both) and the same thread count; the same
client (``qwen2lib.serve.bench.benchmark_server``, vLLM ``benchmark_serving`` semantics) sends the same requests at
each ``--rates`` rate (Poisson arrivals; inf: all at once). ``--rounds`` rounds interleave the servers (each rate
on both, back to back, the order alternating), so load from other work on the machine falls on both; each rate's
rounds are pooled (percentiles over every request, throughput over the summed time) and the per-round throughput
ratios are printed too. Prints one table (with the 1-minute load average seen) and the issue's targets (output
throughput at saturation >= 1.3x llama.cpp's, TTFT p99 no worse at each rate) as PASS / FAIL, and writes the
runs as JSON plus a plot of TTFT and TPOT (median and p99) against the rate. Compare rows of one run only.
A Q8_0 GGUF can also come from the workbook itself: ``qwen2lib export --model Qwen2-0.5B --weights random --format gguf
--type q8_0``.

``--mixed`` runs the mixed-load case instead of the rate sweep: ``--mixed-short`` short chats (64-token prompts,
``--mixed-output`` tokens each) stream while ``--mixed-long`` prompts of 2k-3.8k tokens arrive (Poisson at
``--mixed-long-rate``, from ``--mixed-after`` seconds on). It reports the short streams' ITL p50/p99 (what a newcomer's
prefill costs the running streams) and the long prompts' TTFT (what chunking costs the newcomer), for our server with
chunked prefill (``--prefill-chunk``'s default), ours without (one chunk as long as any prompt), and llama-server
when its binary is found. Every server gets 4096 positions a slot (the compiled graph's limit).

    python benchmarks/serve_vs_llamacpp.py --mixed --gguf model-q8_0.gguf
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp import BUILD_HINT, build_record, describe_build, find_tool  # noqa: E402
from machine import cpu_record, describe_cpu  # noqa: E402

from qwen2lib import load_tokenizer  # noqa: E402
from qwen2lib.artifacts import default_workdir  # noqa: E402
from qwen2lib.serve.bench import (Request, RequestResult, benchmark_server, compute_metrics,  # noqa: E402
                                  load_requests, metrics_table, plot_latency_vs_rate)
from qwen2lib.model.loading import checkpoint_dir  # noqa: E402

LOOPBACK = "127.0.0.1"
OURS, PEER = "qwen2lib int8 graph", "llama.cpp Q8_0"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never via a proxy
# the mixed case: positions a slot needs (the compiled graph's default limit), long prompts' lengths and output
MIXED_CONTEXT, MIXED_LONG_PROMPT, MIXED_LONG_OUTPUT, MIXED_SHORT_PROMPT = 4096, (2048, 3840), 16, 64
NO_CHUNKING = ["--prefill-chunk", str(MIXED_CONTEXT)]  # one chunk holds any prompt the graph accepts: chunking off


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log tail if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}); last log lines:\n"
                             + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        try:
            if NO_PROXY.open(url, timeout=5).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"{url} was not ready after {timeout_s:.0f} s (see {log})")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def ensure_gguf(args, out_dir: Path) -> Path:
    if args.gguf:
        return Path(args.gguf)
    if not args.convert:
        raise SystemExit("give --gguf FILE or --convert path/to/llama.cpp/convert_hf_to_gguf.py")
    gguf = out_dir / f"{Path(args.model).name}-q8_0.gguf"
    if not gguf.is_file():
        folder = checkpoint_dir(args.model, args.weights, args.seed)
        convert = Path(args.convert).resolve()
        # the converter imports gguf-py from its own tree, and sentencepiece (pip install sentencepiece) even for BPE
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(convert.parent / "gguf-py"),
                                                                        os.environ.get("PYTHONPATH")])))
        subprocess.run([sys.executable, str(convert), str(folder), "--outfile", str(gguf), "--outtype", "q8_0"],
                       check=True, env=env)
    return gguf


@contextlib.contextmanager
def running(servers: dict, args):
    """Start every server (label -> (command, ready path, port, log, cwd)); yield label -> base URL; stop them all."""
    processes = {}
    try:
        for label, (command, _, _, log, cwd) in servers.items():
            with open(log, "w") as fh:
                processes[label] = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd)
        urls = {}
        for label, (_, ready_path, port, log, _) in servers.items():
            urls[label] = f"http://{LOOPBACK}:{port}"
            wait_ready(urls[label] + ready_path, processes[label], args.startup_timeout, log)
        yield urls
    finally:
        for process in processes.values():
            stop(process)


def measure(urls: dict, requests, dataset, args) -> dict[str, list[list[dict]]]:
    """label -> per rate, one run per round. Both servers stay up (an idle one waits, it does not spin); within a
    round each rate runs on every server back to back, the order alternating, so machine load drifting over the
    run (other work on the machine) falls on both alike."""
    runs = {label: [[] for _ in args.rates] for label in urls}
    for round_ in range(args.rounds):
        for i, rate in enumerate(args.rates):
            order = list(urls) if (round_ + i) % 2 == 0 else list(reversed(urls))
            for label in order:
                print(f"[round {round_ + 1}/{args.rounds}] {label} at {rate:g} req/s ...", file=sys.stderr, flush=True)
                run = benchmark_server(urls[label], requests, request_rate=rate, max_concurrency=args.max_concurrency,
                                       seed=args.seed + round_, dataset=dataset, label=label, progress=False)
                run["load_avg_1min"] = os.getloadavg()[0]
                runs[label][i].append(run)
    return runs


def pooled(rounds: list[dict]) -> dict:
    """One run from several rounds at one rate: every request's timings together, throughput over the summed time."""
    results = [RequestResult(**r) for run in rounds for r in run["requests"]]
    run = dict(rounds[0], **compute_metrics(results, sum(r["duration_s"] for r in rounds)))
    run.update(failed=sum(r["failed"] for r in rounds), errors=[e for r in rounds for e in r["errors"]][:10],
               rounds=len(rounds), num_requests=sum(r["num_requests"] for r in rounds),
               requests=[r for x in rounds for r in x["requests"]], load_avg_1min=max(r["load_avg_1min"] for r in rounds))
    return run


def compare(ours: list[dict], peer: list[dict]) -> list[str]:
    lines = []
    saturated = [(o, p) for o, p in zip(ours, peer) if math.isinf(o["request_rate"])] or [(ours[-1], peer[-1])]
    o, p = saturated[0]
    ratio = o["output_throughput"] / p["output_throughput"]
    lines.append(f"output tok/s at saturation: {o['output_throughput']:.1f} vs {p['output_throughput']:.1f} = "
                 f"{ratio:.2f}x (target >= 1.3x): {'PASS' if ratio >= 1.3 else 'FAIL'}")
    for o, p in zip(ours, peer):
        ok = o["ttft_ms"]["p99"] <= p["ttft_ms"]["p99"]
        lines.append(f"TTFT p99 at rate {o['request_rate']:g}: {o['ttft_ms']['p99']:.1f} ms vs {p['ttft_ms']['p99']:.1f} ms "
                     f"(target: no worse): {'PASS' if ok else 'FAIL'}")
    return lines


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    for row, stat in zip(axes, ("median", "p99")):
        plot_latency_vs_rate(runs, row, stat=stat)
    for ax in axes.flat:  # a server that falls behind is orders of magnitude slower: log keeps the others readable
        ax.set_yscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")


def server_commands(args, workdir: Path, out: Path) -> dict:
    """label -> (command, ready path, port, log, cwd) of every server to measure: ours (and its variants), llama.cpp's."""
    servers = {}
    variants = ([] if args.skip_ours else [(ROOT, [])]) + [(Path(t).resolve(), []) for t in args.also_tree]
    variants += [(ROOT, shlex.split(extra)) for extra in args.also_args]
    if args.mixed and not args.skip_ours:
        variants.insert(1, (ROOT, NO_CHUNKING))
    slot_context = MIXED_CONTEXT if args.mixed else 2048  # 2048: the rate sweep's longest request
    # the mixed case's KV budget as llama.cpp's -c: every slot at its longest request (the default holds 8 x 2048)
    budget = ["--kv-budget", str(args.slots * MIXED_CONTEXT)] if args.mixed else []
    for tree, extra in variants:
        port = free_port()
        # ``python -m`` from the tree's root imports that tree's qwen2lib; one run folder, so one compiled graph
        command = [sys.executable, "-m", "qwen2lib.cli", "serve", "--model", args.model, "--weights", args.weights,
                   "--seed", str(args.seed), "--port", str(port), "--max-batch", str(args.slots),
                   "--served-model-name", args.model, "--workdir", str(workdir), *budget, *extra]
        tag = "no chunking" if extra == NO_CHUNKING else " ".join(([] if tree == ROOT else [tree.name]) + extra)
        label = OURS + (f" ({tag})" if tag else "")
        servers[label] = (command, "/v1/models", port, out / f"qwen2lib-server-{len(servers)}.log", tree)
    if not args.skip_llama:
        server = args.llama_server or find_tool("llama-server", args.llama_cpp)
        if server is None and args.mixed:  # chunked against unchunked stands without the peer
            print("[mixed] llama-server not found, measuring ours only: " + BUILD_HINT.format(tool="llama-server"),
                  file=sys.stderr)
            return servers
        if server is None:
            raise SystemExit("llama-server not found: " + BUILD_HINT.format(tool="llama-server"))
        args.llama_server = str(server)
        gguf = ensure_gguf(args, out)
        context = args.slots * slot_context  # llama.cpp splits -c between its slots
        for extra in args.llama_variant:
            port = free_port()
            command = [args.llama_server, "-m", str(gguf), "--host", LOOPBACK, "--port", str(port), "-np",
                       str(args.slots), "-c", str(context), "-t", str(args.threads), "-tb", str(args.threads), "-cb",
                       *shlex.split(extra)]
            label = PEER + (f" ({extra})" if extra else "")
            servers[label] = (command, "/health", port, out / f"llama-server-{len(servers)}.log", None)
    return servers


def report(rounds: dict, runs: dict, args) -> None:
    """The table, then each of our servers against each llama.cpp variant: per-round ratios and the targets."""
    import pandas as pd

    every = [r for label_runs in runs.values() for r in label_runs]
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.float_format", "{:.1f}".format):
        table = metrics_table(every)
        table["load"] = [r["load_avg_1min"] for r in every]
        print(table[["rate", "requests", "failed", "ttft median ms", "ttft p99 ms", "tpot median ms", "tpot p99 ms",
                     "itl p99 ms", "out tok/s", "req/s", "load"]].to_string())
    peers = [label for label in runs if label.startswith(PEER)]
    for label in [label for label in runs if label.startswith(OURS)]:
        for peer in peers:
            print(f"--- {label} against {peer}")
            for i, rate in enumerate(args.rates):
                ratios = [o["output_throughput"] / p["output_throughput"] for o, p in zip(rounds[label][i], rounds[peer][i])]
                print(f"rate {rate:g}: output tok/s ratio per round " + ", ".join(f"{r:.2f}x" for r in ratios))
            for line in compare(runs[label], runs[peer]):
                print(line)
    if OURS in runs and len(peers) > 1:  # the verdict: against llama.cpp's better variant on each figure
        best = [{"request_rate": rate, "output_throughput": max(runs[p][i]["output_throughput"] for p in peers),
                 "ttft_ms": {"p99": min(runs[p][i]["ttft_ms"]["p99"] for p in peers)}} for i, rate in enumerate(args.rates)]
        print(f"--- {OURS} against the better llama.cpp variant on each figure")
        for line in compare(runs[OURS], best):
            print(line)


def mixed_requests(args, vocab_size: int = 151643) -> tuple[list[Request], list[Request]]:
    """(short chats, long prompts), seeded random ids from the ordinary vocabulary: only the lengths matter."""
    rng = np.random.default_rng(args.seed)
    shorts = [Request(rng.integers(0, vocab_size, MIXED_SHORT_PROMPT).tolist(), args.mixed_output)
              for _ in range(args.mixed_short)]
    longs = [Request(rng.integers(0, vocab_size, int(rng.integers(*MIXED_LONG_PROMPT))).tolist(), MIXED_LONG_OUTPUT)
             for _ in range(args.mixed_long)]
    return shorts, longs


def mixed_run(url: str, shorts, longs, args, label: str, seed: int) -> tuple[dict, dict]:
    """The short chats all at once and, ``--mixed-after`` seconds later, the long prompts at their rate; two clients
    on two threads (each its own event loop), so the long prompts arrive while the short ones stream."""
    def long_prompts():
        time.sleep(args.mixed_after)
        return benchmark_server(url, longs, request_rate=args.mixed_long_rate, seed=seed, dataset="mixed-long",
                                label=label, progress=False)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        late = pool.submit(long_prompts)
        short = benchmark_server(url, shorts, seed=seed, dataset="mixed-short", label=label, progress=False)
        return short, late.result()


def measure_mixed(urls: dict, shorts, longs, args) -> dict[str, dict[str, list[dict]]]:
    """label -> {"short": runs, "long": runs}, one per round, the servers' order alternating between rounds."""
    runs = {label: {"short": [], "long": []} for label in urls}
    for round_ in range(args.rounds):
        for label in (list(urls) if round_ % 2 == 0 else list(reversed(urls))):
            print(f"[mixed round {round_ + 1}/{args.rounds}] {label} ...", file=sys.stderr, flush=True)
            short, long_ = mixed_run(urls[label], shorts, longs, args, label, args.seed + round_)
            for kind, run in (("short", short), ("long", long_)):
                run["load_avg_1min"] = os.getloadavg()[0]
                runs[label][kind].append(run)
    return runs


def mixed_report(rounds: dict) -> dict:
    """Print one row per server (short streams' ITL, long prompts' TTFT, pooled over rounds); the pooled runs."""
    pooled_runs = {label: {kind: pooled(runs) for kind, runs in kinds.items()} for label, kinds in rounds.items()}
    print(f"{'server':48s} {'short ITL p50':>14s} {'short ITL p99':>14s} {'short TPOT p99':>15s} "
          f"{'long TTFT p50':>14s} {'long TTFT p99':>14s} {'failed':>7s}")
    for label, run in pooled_runs.items():
        short, long_ = run["short"], run["long"]
        print(f"{label:48s} {short['itl_ms']['median']:11.1f} ms {short['itl_ms']['p99']:11.1f} ms "
              f"{short['tpot_ms']['p99']:12.1f} ms {long_['ttft_ms']['median']:11.1f} ms "
              f"{long_['ttft_ms']['p99']:11.1f} ms {short['failed'] + long_['failed']:7d}")
    chunked, whole = pooled_runs.get(OURS), pooled_runs.get(f"{OURS} (no chunking)")
    if chunked and whole:
        a, b = chunked["short"]["itl_ms"]["p99"], whole["short"]["itl_ms"]["p99"]
        print(f"chunked prefill: short streams' ITL p99 {a:.1f} ms against {b:.1f} ms without ({b / a:.2f}x lower); "
              f"long prompts' TTFT p99 {chunked['long']['ttft_ms']['p99']:.1f} ms against "
              f"{whole['long']['ttft_ms']['p99']:.1f} ms")
    return pooled_runs


def main_mixed(args, servers: dict, out: Path) -> int:
    shorts, longs = mixed_requests(args)
    with running(servers, args) as urls:
        rounds = measure_mixed(urls, shorts, longs, args)
    runs = mixed_report(rounds)
    (out / "mixed.json").write_text(json.dumps({"pooled": runs, "rounds": rounds}, indent=2) + "\n")
    print(f"wrote {out / 'mixed.json'}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Qwen2-0.5B")
    p.add_argument("--weights", default="random", choices=("auto", "random"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="run folder (default runs/<model>); results go to <workdir>/serve_vs_llamacpp")
    p.add_argument("--llama-server", default=None, help="the llama-server binary (default: found as "
                   "benchmarks/llamacpp.py looks: --llama-cpp, $LLAMA_CPP_DIR, PATH)")
    p.add_argument("--llama-cpp", default=None, help="llama.cpp build folder holding bin/llama-server")
    p.add_argument("--gguf", default=None, help="Q8_0 GGUF of the same checkpoint (default: converted with --convert)")
    p.add_argument("--convert", default=None, help="llama.cpp's convert_hf_to_gguf.py")
    p.add_argument("--dataset", default=None, help="ShareGPT JSON; without it seeded synthetic requests")
    p.add_argument("--num-requests", type=int, default=64, help="requests per run (one rate, one server, one round)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each rate's rounds are pooled")
    p.add_argument("--rates", default="1,2,4,inf", help="request rates, req/s (inf: all at once)")
    p.add_argument("--slots", type=int, default=8, help="rows decoded together, the same for both servers")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="llama.cpp's compute threads; onnxruntime's default is one per core, the same here")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a server may take to come up")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--llama-variant", action="append", default=None, metavar="ARGS",
                   help="extra llama-server arguments, one server each (default: '' and '--poll 0': its threads spin "
                        "between tasks by default; ours sleep by default, so both policies are measured)")
    p.add_argument("--also-tree", action="append", default=[], metavar="DIR",
                   help="also serve from another checkout (e.g. a worktree of main: before and after a change, same run)")
    p.add_argument("--also-args", action="append", default=[], metavar="ARGS",
                   help="also serve from this checkout with these extra `qwen2lib serve` arguments (an A/B in one run)")
    p.add_argument("--mixed", action="store_true", help="the mixed-load case instead of the rate sweep: short streams' "
                   "ITL while long prompts arrive, ours with and without chunked prefill (synthetic requests)")
    p.add_argument("--mixed-short", type=int, default=6, help="--mixed: short chats, all sent at once")
    p.add_argument("--mixed-output", type=int, default=256, help="--mixed: tokens each short chat streams")
    p.add_argument("--mixed-long", type=int, default=4,
                   help=f"--mixed: long prompts ({MIXED_LONG_PROMPT[0]}-{MIXED_LONG_PROMPT[1]} tokens)")
    p.add_argument("--mixed-long-rate", type=float, default=0.5, help="--mixed: long prompts' Poisson rate, req/s")
    p.add_argument("--mixed-after", type=float, default=1.0,
                   help="--mixed: seconds after the short chats before the long prompts start arriving")
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    args.llama_variant = args.llama_variant if args.llama_variant is not None else ["", "--poll 0"]
    # our servers (children, which inherit it) on llama.cpp's fixed count, not on the cores free when they start
    os.environ["QWEN2LIB_THREADS"] = str(args.threads)
    workdir = Path(args.workdir or default_workdir(args.model)).resolve()
    out = workdir / "serve_vs_llamacpp"
    out.mkdir(parents=True, exist_ok=True)

    if args.mixed:
        return main_mixed(args, server_commands(args, workdir, out), out)
    tokenizer = load_tokenizer(args.model)
    requests, dataset = load_requests(args.dataset, tokenizer, args.num_requests, args.seed, mean_prompt=128, mean_output=64)
    servers = server_commands(args, workdir, out)
    with running(servers, args) as urls:
        rounds = measure(urls, requests, dataset, args)
    runs = {label: [pooled(per_rate) for per_rate in label_runs] for label, label_runs in rounds.items()}
    report(rounds, runs, args)
    every = [r for label_runs in runs.values() for r in label_runs]
    provenance = {"cpu": cpu_record(), "llama_server": build_record(Path(args.llama_server)) if args.llama_server else None}
    print(f"CPU {describe_cpu(provenance['cpu'])}; llama-server "
          f"{describe_build(provenance['llama_server']) if provenance['llama_server'] else 'not run'}")
    (out / "runs.json").write_text(json.dumps({"pooled": every, "rounds": rounds, **provenance}, indent=2) + "\n")
    plot(every, out / "ttft_tpot_vs_rate.png")
    print(f"wrote {out / 'runs.json'} and {out / 'ttft_tpot_vs_rate.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
