"""Serving-style performance test: ShareGPT requests (or a labelled synthetic set) through either backend.

Requests are sampled the way vLLM's serving benchmark samples ShareGPT: conversations with at
least two turns, shuffled with a seed; the prompt is the first human turn and the output length
is the token count of the reply that follows; pairs with a prompt or output under 4 tokens, a
prompt over 1024 or prompt + output over 2048 tokens are dropped. Each request then generates
exactly its output length (end tokens ignored, as vLLM's benchmark does), in batches of
``batch_size`` run one after another; a request's clock starts when its batch starts, like a
client limited to ``batch_size`` requests in flight.

Metric names and formulas follow vLLM: TTFT, TPOT = (E2E - TTFT) / (n - 1) per request,
ITL = every gap between consecutive tokens, E2E; each as mean / median / p99 in ms; throughput
over the wall time of the whole run.
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

MIN_TOKENS = 4
MAX_PROMPT_TOKENS = 1024
MAX_TOTAL_TOKENS = 2048
HUMAN_ROLES = ("human", "user")
SYNTHETIC = "synthetic"


@dataclass
class Request:
    prompt_ids: list[int]
    output_len: int
    prompt: str | None = None  # the ShareGPT text; None for synthetic requests

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int  # tokens actually generated
    ttft_s: float
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.output_len - 1) if self.output_len > 1 else None


# ---- requests ---------------------------------------------------------------------------------

def sharegpt_pairs(conversations: list[dict]) -> list[tuple[str, str]]:
    """(first human turn, the reply after it) of every conversation with at least two turns."""
    pairs = []
    for item in conversations:
        turns = item.get("conversations") or item.get("conversation") or []
        if len(turns) < 2:
            continue
        first = next((i for i, t in enumerate(turns) if t.get("from", t.get("role")) in HUMAN_ROLES), None)
        if first is None or first + 1 >= len(turns):
            continue
        pairs.append((turns[first]["value"], turns[first + 1]["value"]))
    return pairs


def sample_sharegpt_requests(path: str | Path, tokenizer, num_requests: int, seed: int = 0) -> list[Request]:
    """Up to ``num_requests`` requests from a ShareGPT JSON file, filtered and shuffled as vLLM does."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a ShareGPT-format JSON file (a list of "
                                '{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]})')
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): expected the ShareGPT layout") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
    pairs = sharegpt_pairs(data)
    random.Random(seed).shuffle(pairs)
    requests = []
    for prompt, reply in pairs:
        if len(requests) == num_requests:
            break
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        output_len = len(tokenizer.encode(reply, add_special_tokens=False))
        if len(prompt_ids) < MIN_TOKENS or output_len < MIN_TOKENS:
            continue
        if len(prompt_ids) > MAX_PROMPT_TOKENS or len(prompt_ids) + output_len > MAX_TOTAL_TOKENS:
            continue
        requests.append(Request(prompt_ids, output_len, prompt))
    if not requests:
        raise ValueError(f"{path}: no conversation survived the filters (>= 2 turns, prompt and reply >= "
                         f"{MIN_TOKENS} tokens, prompt <= {MAX_PROMPT_TOKENS}, total <= {MAX_TOTAL_TOKENS})")
    return requests


def synthetic_requests(num_requests: int, seed: int = 0, vocab_size: int = 151643, mean_prompt: int = 128,
                       mean_output: int = 64, max_total: int = MAX_TOTAL_TOKENS) -> list[Request]:
    """Seeded stand-in for ShareGPT when no file is at hand: lognormal lengths, random token ids.

    Only the lengths matter for speed; the ids are drawn from the ordinary (non-control) vocabulary.
    """
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(num_requests):
        prompt_len = int(np.clip(rng.lognormal(np.log(mean_prompt), 0.6), MIN_TOKENS, MAX_PROMPT_TOKENS))
        output_len = int(np.clip(rng.lognormal(np.log(mean_output), 0.6), MIN_TOKENS, max_total - prompt_len))
        requests.append(Request(rng.integers(0, vocab_size, prompt_len).tolist(), output_len))
    return requests


def load_requests(dataset: str | Path | None, tokenizer, num_requests: int, seed: int = 0, **synthetic_kwargs):
    """(requests, label): the ShareGPT file's name, or "synthetic" when no file is given."""
    if dataset:
        return sample_sharegpt_requests(dataset, tokenizer, num_requests, seed), Path(dataset).name
    return synthetic_requests(num_requests, seed, **synthetic_kwargs), SYNTHETIC


# ---- running ----------------------------------------------------------------------------------

def run_requests(backend, requests: Sequence[Request], batch_size: int = 1, progress: bool = True,
                 desc: str = "bench") -> tuple[list[RequestResult], float]:
    """Generate every request at its forced output length; (per-request results, wall seconds)."""
    from tqdm.auto import tqdm

    from .generation import SamplingParams, generate

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use 1 or more")
    params = SamplingParams(max_new_tokens=max(r.output_len for r in requests), ignore_eos=True)
    results: list[RequestResult] = []
    bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, file=sys.stderr)
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first:first + batch_size]
        completions = generate(backend, None, [r.prompt_ids for r in batch], params,
                               max_new_tokens=[r.output_len for r in batch], stop_ids=set())
        for r, c in zip(batch, completions):
            results.append(RequestResult(r.prompt_len, len(c.token_ids), c.ttft_s, c.itl_s, c.e2e_s))
        bar.update(len(batch))
    duration = time.perf_counter() - start
    bar.close()
    return results, duration


def _stats_ms(values_s: Sequence[float]) -> dict:
    if not len(values_s):
        return {"mean": None, "median": None, "p99": None}
    ms = np.asarray(values_s, dtype=float) * 1e3
    return {"mean": float(ms.mean()), "median": float(np.median(ms)), "p99": float(np.percentile(ms, 99))}


def compute_metrics(results: Sequence[RequestResult], duration_s: float) -> dict:
    """vLLM's serving metrics from per-request timings and the run's wall time."""
    if not results or duration_s <= 0:
        raise ValueError("no completed requests (or a zero duration) to compute metrics from")
    total_input = sum(r.prompt_len for r in results)
    total_output = sum(r.output_len for r in results)
    return {
        "completed": len(results),
        "duration_s": duration_s,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(results) / duration_s,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "ttft_ms": _stats_ms([r.ttft_s for r in results]),
        "tpot_ms": _stats_ms([r.tpot_s for r in results if r.tpot_s is not None]),
        "itl_ms": _stats_ms([gap for r in results for gap in r.itl_s]),
        "e2e_ms": _stats_ms([r.e2e_s for r in results]),
    }


def benchmark(backend, requests: Sequence[Request], batch_size: int = 1, *, dataset: str = SYNTHETIC,
              label: str = "", progress: bool = True, warmup: bool = True) -> dict:
    """Run and summarise: the metrics plus what was run, and the raw per-request timings."""
    if warmup:  # a first call at a new batch shape pays one-off costs (allocator, onnxruntime arena growth)
        run_requests(backend, [Request(r.prompt_ids, 2) for r in requests[:batch_size]], batch_size, progress=False)
    results, duration = run_requests(backend, requests, batch_size, progress, desc=f"{label or 'bench'} bs={batch_size}")
    return {
        "label": label,
        "backend": getattr(backend, "name", type(backend).__name__),
        "dataset": dataset,
        "num_requests": len(requests),
        "batch_size": batch_size,
        **compute_metrics(results, duration),
        "requests": [asdict(r) for r in results],
    }


def sweep_batch_sizes(backend, requests: Sequence[Request], batch_sizes: Sequence[int], **kwargs) -> list[dict]:
    return [benchmark(backend, requests, bs, **kwargs) for bs in batch_sizes]


# ---- reporting --------------------------------------------------------------------------------

def metrics_table(runs: dict | Sequence[dict]):
    """One row per run: latency stats (ms) and throughputs, as a pandas DataFrame."""
    import pandas as pd

    runs = [runs] if isinstance(runs, dict) else list(runs)
    rows = []
    for run in runs:
        row = {"label": run.get("label") or run.get("backend"), "dataset": run["dataset"], "batch": run["batch_size"],
               "requests": run["completed"]}
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            for stat in ("mean", "median", "p99"):
                row[f"{key[:-3]} {stat} ms"] = run[key][stat]
        row.update({"req/s": run["request_throughput"], "out tok/s": run["output_throughput"],
                    "total tok/s": run["total_token_throughput"]})
        rows.append(row)
    return pd.DataFrame(rows).set_index("label")


def plot_latency_cdf(runs: dict | Sequence[dict], ax=None, metrics: Sequence[str] = ("ttft", "e2e")):
    """Empirical CDF of per-request latencies, one line per run and metric."""
    import matplotlib.pyplot as plt

    runs = [runs] if isinstance(runs, dict) else list(runs)
    ax = ax or plt.subplots(figsize=(7, 4))[1]
    for run in runs:
        for metric in metrics:
            values = np.sort([1e3 * r[f"{metric}_s"] for r in run["requests"]])
            fraction = np.arange(len(values) + 1) / len(values)  # from 0 at the fastest request to 1
            ax.step(np.r_[values[:1], values], fraction, where="post",
                    label=f"{run.get('label') or run['backend']} {metric.upper()}")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"Latency CDF ({runs[0]['dataset']} requests)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_throughput_vs_batch(runs: Sequence[dict], ax=None):
    """Output token throughput against batch size, one line per label."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(6, 4))[1]
    labels = dict.fromkeys(run.get("label") or run["backend"] for run in runs)
    for label in labels:
        points = sorted((r["batch_size"], r["output_throughput"]) for r in runs if (r.get("label") or r["backend"]) == label)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("batch size")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"Throughput vs batch size ({runs[0]['dataset']} requests)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def save_run(run: dict, folder: str | Path, name: str) -> Path:
    from .artifacts import atomic_write_text

    return atomic_write_text(Path(folder) / f"{name}.json", json.dumps(run, indent=2) + "\n")


# ---- command line -----------------------------------------------------------------------------

def cmd_bench(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from .artifacts import stage_dir
    from .cli import workdir_of
    from .generation import load_backend
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    requests, dataset = load_requests(args.dataset, tokenizer, args.num_requests, args.seed)
    if dataset == SYNTHETIC:
        print(f"[bench] no --dataset: {len(requests)} SYNTHETIC requests (seeded lognormal lengths, random tokens)",
              file=sys.stderr)
    backend = load_backend(args.model, args.backend, weights=args.weights, dtype=args.dtype, seed=args.seed,
                           compiled=args.compiled, workdir=workdir_of(args), precision=args.precision)
    label = f"{args.backend}" + (f"-{args.precision}" if args.backend == "onnx" else f"-{args.dtype}")
    run = benchmark(backend, requests, args.batch_size, dataset=dataset, label=label)
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.float_format", "{:.2f}".format):
        print(metrics_table(run).T.to_string())
    out = stage_dir(workdir_of(args), "inference")
    name = f"bench-{label}-{dataset.removesuffix('.json')}-bs{args.batch_size}"
    path = save_run(run, out, name)
    ax = plot_latency_cdf(run)
    ax.figure.savefig(out / f"{name}-cdf.png", dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    print(f"[bench] wrote {path}", file=sys.stderr)
    return 0


def register_cli(sub) -> None:
    from .cli import add_model_args
    from .generation import add_backend_args

    p = sub.add_parser("bench", help="serving-style benchmark (ShareGPT requests or synthetic) -> <workdir>/inference/")
    add_model_args(p)
    add_backend_args(p)
    p.add_argument("--dataset", default=None, help="ShareGPT-format JSON; without it a seeded synthetic set")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1)
    p.set_defaults(func=cmd_bench)
