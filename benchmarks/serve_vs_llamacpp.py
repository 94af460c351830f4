"""Our server (int8 graph, continuous batching) against llama.cpp's ``llama-server`` on the same checkpoint, one run.

    python benchmarks/serve_vs_llamacpp.py --model tiny --llama-server /path/to/llama-server \\
        --convert /path/to/llama.cpp/convert_hf_to_gguf.py          # or --gguf model-q8_0.gguf
    python benchmarks/serve_vs_llamacpp.py --model tiny --dataset ShareGPT_V3_unfiltered_cleaned_split.json

``llama-server`` is built from the llama.cpp sources vendored in the llama-cpp-python source package
(``pip download llama-cpp-python --no-binary :all:``, then ``cmake -B build && cmake --build build --target
llama-server`` in ``vendor/llama.cpp``); its GGUF is the same checkpoint converted by llama.cpp's
``convert_hf_to_gguf.py --outtype q8_0`` (gguf-py from the same tree; it also imports ``sentencepiece``, so have
that importable, e.g. on PYTHONPATH) unless ``--gguf`` names one.

Both servers run as child processes on 127.0.0.1 (free ports), one after the other, with the same slot count
(our ``--max-batch``, llama.cpp's ``-np``, continuous batching in both) and the same thread count; the same
client (``qwen2lib.bench.benchmark_server``, vLLM ``benchmark_serving`` semantics) sends the same requests at
each ``--rates`` rate (Poisson arrivals; inf: all at once). Prints one table and the issue's targets (output
throughput at saturation >= 1.3x llama.cpp's, TTFT p99 no worse at each rate) as PASS / FAIL, and writes the
runs as JSON plus a plot of TTFT and TPOT against the rate. Compare rows of one run only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp import BUILD_HINT, find_tool  # noqa: E402

from qwen2lib import load_tokenizer  # noqa: E402
from qwen2lib.artifacts import default_workdir  # noqa: E402
from qwen2lib.bench import benchmark_server, load_requests, metrics_table, plot_latency_vs_rate  # noqa: E402
from qwen2lib.loading import checkpoint_dir  # noqa: E402

LOOPBACK = "127.0.0.1"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never via a proxy


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


def measure(label: str, command: list[str], ready_path: str, port: int, requests, dataset, args, log: Path) -> list[dict]:
    url = f"http://{LOOPBACK}:{port}"
    with open(log, "w") as fh:
        process = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_ready(url + ready_path, process, args.startup_timeout, log)
        runs = []
        for rate in args.rates:
            print(f"[{label}] request rate {rate:g} ...", file=sys.stderr, flush=True)
            runs.append(benchmark_server(url, requests, request_rate=rate, max_concurrency=args.max_concurrency,
                                         seed=args.seed, dataset=dataset, label=label, progress=False))
        return runs
    finally:
        stop(process)


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--weights", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="run folder (default runs/<model>); results go to <workdir>/serve_vs_llamacpp")
    p.add_argument("--llama-server", default=None, help="the llama-server binary (default: found as "
                   "benchmarks/llamacpp.py looks: --llama-cpp, $LLAMA_CPP_DIR, PATH)")
    p.add_argument("--llama-cpp", default=None, help="llama.cpp build folder holding bin/llama-server")
    p.add_argument("--gguf", default=None, help="Q8_0 GGUF of the same checkpoint (default: converted with --convert)")
    p.add_argument("--convert", default=None, help="llama.cpp's convert_hf_to_gguf.py")
    p.add_argument("--dataset", default=None, help="ShareGPT JSON; without it seeded synthetic requests")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--rates", default="1,2,4,inf", help="request rates, req/s (inf: all at once)")
    p.add_argument("--slots", type=int, default=8, help="rows decoded together, the same for both servers")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="compute threads of each server")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a server may take to come up")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--skip-llama", action="store_true")
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    out = Path(args.workdir or default_workdir(args.model)) / "serve_vs_llamacpp"
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(args.model)
    requests, dataset = load_requests(args.dataset, tokenizer, args.num_requests, args.seed, mean_prompt=128, mean_output=64)
    runs: dict[str, list[dict]] = {}
    if not args.skip_ours:
        port = free_port()
        command = [sys.executable, "-m", "qwen2lib.cli", "serve", "--model", args.model, "--weights", args.weights,
                   "--seed", str(args.seed), "--port", str(port), "--max-batch", str(args.slots),
                   "--served-model-name", args.model] + (["--workdir", args.workdir] if args.workdir else [])
        runs["qwen2lib int8 graph"] = measure("qwen2lib int8 graph", command, "/v1/models", port, requests, dataset, args,
                                              out / "qwen2lib-server.log")
    if not args.skip_llama:
        server = args.llama_server or find_tool("llama-server", args.llama_cpp)
        if server is None:
            raise SystemExit("llama-server not found: " + BUILD_HINT.format(tool="llama-server"))
        args.llama_server = str(server)
        gguf = ensure_gguf(args, out)
        port = free_port()
        context = args.slots * 2048  # llama.cpp splits -c between its slots: 2048 each, the bench's longest request
        command = [args.llama_server, "-m", str(gguf), "--host", LOOPBACK, "--port", str(port), "-np", str(args.slots),
                   "-c", str(context), "-t", str(args.threads), "-tb", str(args.threads), "-cb"]
        runs["llama.cpp Q8_0"] = measure("llama.cpp Q8_0", command, "/health", port, requests, dataset, args,
                                         out / "llama-server.log")
    every = [r for label_runs in runs.values() for r in label_runs]
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", None, "display.float_format", "{:.1f}".format):
        print(metrics_table(every)[["rate", "requests", "failed", "ttft median ms", "ttft p99 ms", "tpot median ms",
                                    "tpot p99 ms", "itl p99 ms", "out tok/s", "req/s"]].to_string())
    if len(runs) == 2:
        for line in compare(*runs.values()):
            print(line)
    (out / "runs.json").write_text(json.dumps(every, indent=2) + "\n")
    axes = plot_latency_vs_rate(every)
    axes[0].figure.savefig(out / "ttft_tpot_vs_rate.png", dpi=120, bbox_inches="tight")
    print(f"wrote {out / 'runs.json'} and {out / 'ttft_tpot_vs_rate.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
