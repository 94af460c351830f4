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

Two ways to run the requests. In process (``benchmark``): fixed batches back to back, the no-server
baseline. Against a server (``benchmark_server``, ``qwen2lib bench --url``): any OpenAI-compatible
endpoint (``qwen2lib serve``, llama.cpp's ``llama-server``, vLLM) is sent the same requests the way
vLLM's ``benchmark_serving`` sends them: streamed completions with ``max_tokens`` = the reply's length
and ``ignore_eos``, arriving as a Poisson process at ``request_rate`` per second (gamma gaps with shape
``burstiness``; all at once when the rate is infinite), at most ``max_concurrency`` in flight. TTFT is
the first streamed token chunk, ITL every gap between chunks, E2E the last chunk, each from the moment
the request was sent; output tokens come from the server's ``usage``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import aiohttp
import matplotlib.pyplot as plt
import numpy as np
from tqdm.auto import tqdm

from ..artifacts import atomic_write_text
from ..errors import BadInputError, MissingInputError, Qwen2LibError
from .generation import SamplingParams, generate

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
    for n, item in enumerate(conversations):
        turns = item.get("conversations") or item.get("conversation") or [] if isinstance(item, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                                  for t in turns):
            raise BadInputError(f"conversation {n} is not in the ShareGPT layout: expected "
                                '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}')
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
        raise MissingInputError(f"{path} does not exist: pass a ShareGPT-format JSON file (a list of "
                                '{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]})')
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path} is not valid UTF-8 JSON ({exc}): expected the ShareGPT layout") from exc
    if not isinstance(data, list):
        raise BadInputError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
    try:
        pairs = sharegpt_pairs(data)
    except BadInputError as exc:
        raise BadInputError(f"{path}: {exc}") from None
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
        raise BadInputError(f"{path}: no conversation survived the filters (>= 2 turns, prompt and reply >= "
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
    if batch_size < 1:
        raise BadInputError(f"batch_size={batch_size}: use 1 or more")
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


# ---- against a server -------------------------------------------------------------------------

def arrival_delays(num_requests: int, request_rate: float = math.inf, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Seconds to wait before sending each request: 0 first, then gamma gaps of mean 1 / request_rate.

    burstiness 1 is a Poisson process (exponential gaps); an infinite rate sends everything at once.
    """
    if not request_rate > 0 or not burstiness > 0:
        raise BadInputError(f"request_rate={request_rate}, burstiness={burstiness}: both must be > 0 (inf: all at once)")
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (request_rate * burstiness), num_requests)
    gaps[0] = 0.0
    return gaps


def base_url(url: str) -> str:
    """``http://host:port`` from a server address given with or without ``/v1``."""
    if not url.startswith(("http://", "https://")):
        raise Qwen2LibError(f"--url {url!r}: give the server's address, e.g. http://127.0.0.1:8000")
    return url.rstrip("/").removesuffix("/v1")


def _request_body(request: Request, model: str, chat: bool, tokenizer) -> dict:
    body = {"model": model, "max_tokens": request.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    if chat:
        text = request.prompt if request.prompt is not None else tokenizer.decode(request.prompt_ids)
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = request.prompt if request.prompt is not None else request.prompt_ids
    return body


class StreamError(Exception):
    """A streamed completion the server refused or broke off (HTTP status, or an error event in the stream)."""


async def stream_pieces(session, endpoint: str, body: dict, chat: bool):
    """One streamed completion, read as a client of an OpenAI-compatible server reads it (server-sent events,
    ``data: {json}`` lines, ``data: [DONE]`` last): yields ``(text, None)`` per token and ``(None, usage)`` when the
    server reports the counts; raises StreamError on an HTTP or in-stream error."""
    async with session.post(endpoint, json=body) as response:
        if response.status != 200:
            raise StreamError(f"HTTP {response.status}: {(await response.text())[:300]}")
        async for line in response.content:
            line = line.strip()
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("error"):
                raise StreamError(f"server error: {chunk['error'].get('message', chunk['error'])}")
            choice = (chunk.get("choices") or [None])[0]
            piece = None if choice is None else (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if piece is not None and (piece or not choice.get("finish_reason")):  # a token, not a bare terminator
                yield piece, None
            if chunk.get("usage"):
                yield None, chunk["usage"]


async def _send(session, endpoint: str, body: dict, request: Request, chat: bool) -> RequestResult | str:
    """One streamed request -> its timings, or the reason it failed."""
    start = time.perf_counter()
    times, usage = [], {}
    try:
        async for piece, reported in stream_pieces(session, endpoint, body, chat):
            if piece is None:
                usage = reported
            else:
                times.append(time.perf_counter())
    except StreamError as exc:
        return str(exc)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    if not times:
        return "the stream held no tokens"
    n = int(usage.get("completion_tokens") or len(times))
    return RequestResult(int(usage.get("prompt_tokens") or request.prompt_len), n, times[0] - start,
                         [b - a for a, b in zip(times, times[1:])], times[-1] - start)


def stream_chat(url: str, body: dict, on_text: Callable[[str], None] | None = None, timeout_s: float = 300) -> dict:
    """One streamed chat completion (``body``: the OpenAI request, ``"stream": True`` added) from the server at
    ``url``, each token's text handed to ``on_text`` as it arrives: {"text", "usage"}. Raises Qwen2LibError when
    the server refuses or breaks off the answer."""
    endpoint = f"{base_url(url)}/v1/chat/completions"

    async def run() -> dict:
        pieces, usage = [], {}
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s), connector=connector) as session:
            try:
                async for piece, reported in stream_pieces(session, endpoint, {**body, "stream": True}, chat=True):
                    if piece is None:
                        usage = reported
                    else:
                        pieces.append(piece)
                        if on_text is not None:
                            on_text(piece)
            except (StreamError, aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
                raise Qwen2LibError(f"{endpoint}: {exc}".splitlines()[0]) from exc
        return {"text": "".join(pieces), "usage": usage}

    return run_coroutine(run())


async def _load(url, requests, model, chat, tokenizer, delays, max_concurrency, timeout_s, progress):
    endpoint = f"{url}/v1/{'chat/completions' if chat else 'completions'}"
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), desc="bench --url", unit="req", disable=not progress, file=sys.stderr)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    # a connection per request, as vLLM's client opens a session per request: a kept-alive connection the server
    # has just closed (llama-server closes idle ones) would fail the request that reuses it
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def one(request):
            body = _request_body(request, model, chat, tokenizer)
            if limit is None:
                outcome = await _send(session, endpoint, body, request, chat)
            else:
                async with limit:
                    outcome = await _send(session, endpoint, body, request, chat)
            bar.update(1)
            return outcome

        probe = await _send(session, endpoint, _request_body(Request(requests[0].prompt_ids, 2, requests[0].prompt),
                                                              model, chat, tokenizer), requests[0], chat)
        if isinstance(probe, str):
            raise Qwen2LibError(f"{endpoint}: the test request failed ({probe}); is the server up and serving {model!r}?")
        tasks, start = [], time.perf_counter()
        for delay, request in zip(delays, requests):
            if delay:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request)))
        outcomes = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return outcomes, duration


async def _served_model(url: str, timeout_s: float) -> str:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(f"{url}/v1/models") as response:
                return (await response.json())["data"][0]["id"]
    except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError, ValueError) as exc:
        raise Qwen2LibError(f"{url}/v1/models did not answer with a model ({type(exc).__name__}: {exc}); "
                            "is an OpenAI-compatible server running there? (pass --served-model to skip the lookup)") from exc


def run_coroutine(coro):
    """``asyncio.run(coro)``, also where an event loop already runs (a Jupyter kernel): then in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def benchmark_server(url: str, requests: Sequence[Request], *, request_rate: float = math.inf,
                     max_concurrency: int | None = None, model: str | None = None, chat: bool = False, tokenizer=None,
                     burstiness: float = 1.0, seed: int = 0, dataset: str = SYNTHETIC, label: str = "",
                     timeout_s: float = 600.0, progress: bool = True) -> dict:
    """Send ``requests`` to an OpenAI-compatible server as vLLM's benchmark_serving does; the same dict as ``benchmark``."""
    url = base_url(url)
    if max_concurrency is not None and max_concurrency < 1:
        raise BadInputError(f"max_concurrency={max_concurrency}: use 1 or more, or None for no limit")
    if not requests:
        raise ValueError("no requests to send")
    if chat and tokenizer is None and any(r.prompt is None for r in requests):
        raise ValueError("the chat endpoint takes text: pass tokenizer= to decode the synthetic token ids, or a ShareGPT set")
    delays = arrival_delays(len(requests), request_rate, burstiness, seed)
    model = model or run_coroutine(_served_model(url, timeout_s))
    outcomes, duration = run_coroutine(_load(url, list(requests), model, chat, tokenizer, delays, max_concurrency,
                                           timeout_s, progress))
    results = [o for o in outcomes if isinstance(o, RequestResult)]
    errors = [o for o in outcomes if isinstance(o, str)]
    if not results:
        raise Qwen2LibError(f"all {len(errors)} requests to {url} failed; the first: {errors[0]}")
    return {"label": label or model, "backend": "server", "url": url, "model": model, "dataset": dataset,
            "num_requests": len(requests), "request_rate": request_rate, "max_concurrency": max_concurrency,
            "batch_size": max_concurrency, "failed": len(errors), "errors": errors[:10],
            **compute_metrics(results, duration), "requests": [asdict(r) for r in results]}


# ---- reporting --------------------------------------------------------------------------------

def metrics_table(runs: dict | Sequence[dict]):
    """One row per run: latency stats (ms) and throughputs, as a pandas DataFrame."""
    import pandas as pd  # heavy and optional: only this function needs it

    runs = [runs] if isinstance(runs, dict) else list(runs)
    rows = []
    for run in runs:
        row = {"label": run.get("label") or run.get("backend"), "dataset": run["dataset"], "batch": run["batch_size"],
               "rate": run.get("request_rate"), "requests": run["completed"], "failed": run.get("failed", 0)}
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            for stat in ("mean", "median", "p99"):
                row[f"{key[:-3]} {stat} ms"] = run[key][stat]
        row.update({"req/s": run["request_throughput"], "out tok/s": run["output_throughput"],
                    "total tok/s": run["total_token_throughput"]})
        rows.append(row)
    return pd.DataFrame(rows).set_index("label")


def plot_latency_cdf(runs: dict | Sequence[dict], ax=None, metrics: Sequence[str] = ("ttft", "e2e")):
    """Empirical CDF of per-request latencies, one line per run and metric."""
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


def plot_latency_vs_rate(runs: Sequence[dict], axes=None, stat: str = "median"):
    """TTFT and TPOT (``stat``: mean, median or p99) against request rate, one line per label.

    An infinite rate (all at once) is drawn one step beyond the largest finite rate and labelled inf.
    """
    axes = axes if axes is not None else plt.subplots(1, 2, figsize=(11, 4))[1]
    finite = sorted({r["request_rate"] for r in runs if not math.isinf(r["request_rate"])}) or [1.0]
    inf_at = finite[-1] * 2
    for label in dict.fromkeys(r["label"] for r in runs):
        points = sorted((inf_at if math.isinf(r["request_rate"]) else r["request_rate"], r) for r in runs
                        if r["label"] == label)
        for ax, metric in zip(axes, ("ttft_ms", "tpot_ms")):
            ax.plot([x for x, _ in points], [r[metric][stat] for _, r in points], marker="o", label=label)
    ticks = finite + ([inf_at] if any(math.isinf(r["request_rate"]) for r in runs) else [])
    for ax, name in zip(axes, ("TTFT", "TPOT")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [("inf" if t == inf_at and t not in finite else f"{t:g}") for t in ticks])
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{name} {stat} (ms)")
        ax.set_title(f"{name} against request rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return axes


def save_run(run: dict, folder: str | Path, name: str) -> Path:
    return atomic_write_text(Path(folder) / f"{name}.json", json.dumps(run, indent=2) + "\n")
