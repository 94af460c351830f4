"""The inference subcommands: ``generate``, ``chat``, ``serve``, ``bench`` and ``eval``, on any stage's backend."""
from __future__ import annotations

import errno
import json
import math
import sys
from pathlib import Path

import matplotlib
import pandas as pd
from aiohttp import web

matplotlib.use("Agg")  # the command line saves its plots to files; no window
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

from ..artifacts import atomic_write_text, stage_dir
from ..serve.bench import (SYNTHETIC, base_url, benchmark, benchmark_server, load_requests, metrics_table,
                           plot_latency_cdf, save_run)
from ..serve.chat import COMMANDS, ChatSession, repl, use_chat_template
from ..errors import BadInputError, Qwen2LibError
from ..evaluation.accuracy import download_ceval, text_perplexity
from ..evaluation.datasets import DATASETS, TITLES, EvalDataError, open_benchmark
from ..evaluation.runner import MODES, accuracy_table, evaluate_benchmark, plan
from ..serve.generation import SamplingParams, encode_prompt, generate, stop_token_ids
from ..model.long_context import workdir_tag
from ..pipeline import ACCURACY_STAGES, STAGE_BACKENDS, load_backend, stage_backend
from ..serve.server import LOOPBACK, build_app
from ..serve.engine import EngineConfig
from ..model.tokenizer import load_tokenizer
from .common import add_long_context_args, add_model_args, long_context_of, workdir_of


# ---- generation ----------------------------------------------------------------------------------


def say_runs(command: str, backend) -> None:
    """The one line every inference command prints once: the stage folder or graph it runs, and its precision."""
    print(f"[{command}] runs {backend.runs}", file=sys.stderr, flush=True)


def cmd_generate(args) -> int:
    params = sampling_params_of(args)  # before loading: bad sampling input is refused in a second, not a minute
    tokenizer = load_tokenizer(args.model)
    prompt_tokens = len(encode_prompt(tokenizer, args.prompt, chat=args.chat))  # the KV cache the run will fill
    shape = {"context": prompt_tokens + params.max_new_tokens, "prompt_tokens": prompt_tokens}
    backend = load_backend(args.model, args.backend, weights=args.weights, dtype=args.dtype, seed=args.seed,
                           compiled=args.compiled, workdir=workdir_of(args), precision=args.precision,
                           long_context=long_context_of(args), shape=shape)
    say_runs("generate", backend)
    print(args.prompt if not args.chat else "", end="", flush=True)
    result = generate(backend, tokenizer, args.prompt, params, chat=args.chat, truncate=args.truncate,
                      on_text=lambda _, delta: print(delta, end="", flush=True))
    n = len(result.token_ids)
    tpot = result.tpot_s
    print(f"\n[generate] {n} tokens ({result.finish_reason}), TTFT {1e3 * result.ttft_s:.1f} ms"
          + (f", {1 / tpot:.1f} tok/s after the first" if tpot else ""), file=sys.stderr)
    return 0


def add_sampling_args(p, max_new_tokens: int = 64) -> None:
    """--max-new-tokens/--temperature/--top-k/--top-p/--repetition-penalty (generate, chat); --seed is a model arg."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)


def sampling_params_of(args) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def add_backend_args(p) -> None:
    """--backend/--compiled/--precision: which runtime, and which compiled graph for onnx (generate, bench, eval);
    --dca/--yarn: long-context settings (qwen2lib.model.long_context)."""

    p.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    p.add_argument("--compiled", default=None, help="compiled graph folder (default: <workdir>/compiled, built if missing)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8", "int4"),
                   help="which compiled graph (onnx)")
    add_long_context_args(p)


def register_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate from a prompt on the torch model or a compiled graph, streaming")
    add_model_args(p)
    add_backend_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (-Instruct models)")
    add_sampling_args(p)
    p.add_argument("--truncate", default=None, choices=("left",), help="cut an over-long prompt from the left")
    p.set_defaults(func=cmd_generate)

# ---- chat ----------------------------------------------------------------------------------------


def cmd_chat(args) -> int:
    params = sampling_params_of(args)  # bad sampling input is refused before a model loads
    tokenizer = use_chat_template(load_tokenizer(args.model), args.chat_template)
    # a conversation grows turn by turn: the memory check assumes footprint's default context (4096 positions)
    backend = load_backend(args.model, args.backend, weights=args.weights, dtype=args.dtype, seed=args.seed,
                           compiled=args.compiled, workdir=workdir_of(args), precision=args.precision,
                           long_context=long_context_of(args))
    session = ChatSession(backend, tokenizer, system=args.system, params=params)
    say_runs("chat", backend)
    print("[chat] " + "; ".join(f"{c}: {h}" for c, h in COMMANDS.items()), file=sys.stderr, flush=True)
    return repl(session)


def register_chat(sub) -> None:
    p = sub.add_parser("chat", help="chat in the terminal (system prompt, multi-turn history, streamed replies, /reset, /exit)")
    add_model_args(p)
    add_backend_args(p)
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's own, if any)")
    p.add_argument("--chat-template", default=None, metavar="MODEL_OR_FILE",
                   help="use this model's chat template (or a .jinja file) instead of the tokenizer's own")
    add_sampling_args(p, max_new_tokens=256)
    p.set_defaults(func=cmd_chat)

# ---- server --------------------------------------------------------------------------------------


def _check_serve_args(args) -> EngineConfig:
    """Every argument checked before a model loads; a bad one is a one-line error."""

    if args.stage not in STAGE_BACKENDS:
        raise Qwen2LibError(f"--stage {args.stage!r}: one of {', '.join(STAGE_BACKENDS)}")
    if not 0 <= args.port <= 65535:
        raise Qwen2LibError(f"--port {args.port}: use 0..65535 (0 picks a free port)")
    try:
        return EngineConfig(max_batch=args.max_batch, kv_budget_tokens=args.kv_budget, max_queue=args.max_queue,
                            prefill_chunk=args.prefill_chunk)
    except ValueError as exc:
        raise BadInputError(f"{exc}".replace("max_batch", "--max-batch").replace("kv_budget_tokens", "--kv-budget")
                            .replace("max_queue", "--max-queue").replace("prefill_chunk", "--prefill-chunk")) from exc


def cmd_serve(args) -> int:
    config = _check_serve_args(args)
    if args.host != LOOPBACK:
        print(f"[serve] WARNING: listening on {args.host}, not only loopback: other machines can reach it", file=sys.stderr)
    # the KV budget is slots in all (rows x padded length); requests are prefilled one at a time, a chunk at a time
    rows = config.max_batch
    shape = {"context": -(-config.kv_budget_tokens // rows), "batch": rows, "prefill_rows": 1,
             "prompt_tokens": config.prefill_chunk}
    backend = stage_backend(args.stage, args.model, weights=args.weights, workdir=workdir_of(args), seed=args.seed,
                            dtype=args.dtype, last_position_only=True,  # serving reads the last position only
                            spinning=args.ort_spinning == "on", shape=shape)
    say_runs("serve", backend)
    tokenizer = load_tokenizer(args.model)
    name = args.served_model_name or args.model
    app = build_app(backend, tokenizer, name, config)
    print(f"[serve] {name} ({args.stage}) on http://{args.host}:{args.port}/v1  max batch {config.max_batch}, "
          f"KV budget {config.kv_budget_tokens} tokens, queue {config.max_queue}, prefill chunk {config.prefill_chunk}",
          file=sys.stderr)
    try:
        web.run_app(app, host=args.host, port=args.port, handler_cancellation=True, access_log=None, print=None)
    except OSError as exc:  # the bind: the address the user chose is taken, absent or privileged
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        raise Qwen2LibError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}): pick another --port "
                            "(0 picks a free one) or --host") from exc
    return 0


def register_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server with continuous batching (loopback by default)")
    add_model_args(p)
    p.add_argument("--stage", default="int8 graph", help="which stage's backend: 'fp32 torch', 'int8 torch', "
                   "'fp32 graph', 'fp16 graph' or 'int8 graph' (default; built from earlier stages if missing)")
    p.add_argument("--host", default=LOOPBACK, help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (llama.cpp's --parallel)")
    p.add_argument("--kv-budget", type=int, default=16384, help="KV cache slots (rows x padded length) at most")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                   help="prompt tokens prefilled per decode step (default 256): a long prompt joins in chunks, so "
                        "running streams keep getting a token every step instead of waiting for its whole prefill; "
                        "256 is what a compiled graph runs per call anyway, so chunks add no graph calls (a larger N: "
                        "fewer steps for the newcomer, longer stalls for the others; above the longest prompt: no "
                        "chunking)")
    p.add_argument("--ort-spinning", choices=("on", "off"), default="off",
                   help="graph stages: onnxruntime's workers busy-wait between parallel sections (on) or sleep (off, "
                        "the default: the server's event loop and the machine's other work keep the cores)")
    p.set_defaults(func=cmd_serve)

# ---- bench ---------------------------------------------------------------------------------------


def cmd_bench(args) -> int:
    url = _check_bench_args(args)
    tokenizer = load_tokenizer(args.model)
    requests, dataset = load_requests(args.dataset, tokenizer, args.num_requests, args.seed)
    if dataset == SYNTHETIC:
        print(f"[bench] no --dataset: {len(requests)} SYNTHETIC requests (seeded lognormal lengths, random tokens)",
              file=sys.stderr)
    if url is not None:
        return _bench_url(args, url, requests, dataset, tokenizer)
    shape = {"context": max(len(r.prompt_ids) + r.output_len for r in requests), "batch": args.batch_size,
             "prompt_tokens": max(len(r.prompt_ids) for r in requests)}  # fixed batches: rows prefill together
    backend = load_backend(args.model, args.backend, weights=args.weights, dtype=args.dtype, seed=args.seed,
                           compiled=args.compiled, workdir=workdir_of(args), precision=args.precision,
                           long_context=long_context_of(args), shape=shape)
    say_runs("bench", backend)
    tag = workdir_tag(long_context_of(args))
    label = f"{args.backend}" + (f"-{args.precision}" if args.backend == "onnx" else f"-{args.dtype}") + (f"-{tag}" if tag else "")
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


def _check_bench_args(args) -> str | None:
    """Validate before any model or tokenizer loads; the server's base URL when --url is given."""
    if args.num_requests < 1 or args.batch_size < 1:
        raise BadInputError(f"--num-requests {args.num_requests} --batch-size {args.batch_size}: both must be at least 1")
    if args.url is None:
        return None
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BadInputError(f"--max-concurrency {args.max_concurrency}: use 1 or more (omit it for no limit)")
    if not args.request_rate > 0 or not args.burstiness > 0:
        raise BadInputError(f"--request-rate {args.request_rate} --burstiness {args.burstiness}: both must be > 0 "
                            "(--request-rate inf sends everything at once)")
    return base_url(args.url)


def _bench_url(args, url, requests, dataset, tokenizer) -> int:
    print(f"[bench] measures the server at {url} (its own model and precision)", file=sys.stderr, flush=True)
    run = benchmark_server(url, requests, request_rate=args.request_rate, max_concurrency=args.max_concurrency,
                           model=args.served_model, chat=args.endpoint == "chat", tokenizer=tokenizer,
                           burstiness=args.burstiness, seed=args.seed, dataset=dataset, label=args.label or "")
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.float_format", "{:.2f}".format):
        print(metrics_table(run).T.to_string())
    for error in run["errors"][:3]:
        print(f"[bench] failed request: {error}", file=sys.stderr)
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}"
    name = f"bench-url-{run['label']}-{dataset.removesuffix('.json')}-rate{rate}".replace("/", "_")
    path = save_run(run, stage_dir(workdir_of(args), "inference"), name)
    print(f"[bench] wrote {path}", file=sys.stderr)
    return 0


def register_bench(sub) -> None:
    p = sub.add_parser("bench", help="serving-style benchmark (ShareGPT requests or synthetic) -> <workdir>/inference/")
    add_model_args(p)
    add_backend_args(p)
    p.add_argument("--dataset", default=None, help="ShareGPT-format JSON; without it a seeded synthetic set")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1, help="in-process mode: rows per fixed batch")
    p.add_argument("--url", default=None, help="measure this OpenAI-compatible server instead (e.g. http://127.0.0.1:8000); "
                   "--model then only names the tokenizer used to sample the requests")
    p.add_argument("--request-rate", type=float, default=math.inf, help="with --url: Poisson arrivals per second (default inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="with --url: gamma shape of the arrival gaps (1: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="with --url: requests in flight at most (default no limit)")
    p.add_argument("--endpoint", default="completions", choices=("completions", "chat"), help="with --url: which API")
    p.add_argument("--served-model", default=None, help="with --url: the model id to send (default: the server's first)")
    p.add_argument("--label", default=None, help="with --url: name of the run in tables and plots")
    p.set_defaults(func=cmd_bench)

# ---- evaluate ------------------------------------------------------------------------------------


def _workdir(args):
    return workdir_of(args)


def _label(args) -> str:
    if getattr(args, "stage", None):
        return args.stage.replace(" ", "-")

    tag = workdir_tag(long_context_of(args))  # a --dca/--yarn run is its own result, not the plain one's
    return args.backend + (f"-{args.precision}" if args.backend == "onnx" else f"-{args.dtype}") + (f"-{tag}" if tag else "")


def _backend(args, shape: dict):
    """The backend eval scores, checked to fit with ``shape`` (every position's logits) and named once."""
    long_context = long_context_of(args)  # refuses --dca/--yarn with --stage
    if getattr(args, "stage", None):
        backend = stage_backend(args.stage, args.model, weights=args.weights, workdir=_workdir(args), seed=args.seed,
                                dtype=args.dtype, shape=shape)
    else:
        backend = load_backend(args.model, args.backend, weights=args.weights, dtype=args.dtype, seed=args.seed,
                               compiled=args.compiled, workdir=_workdir(args), precision=args.precision,
                               long_context=long_context, shape=shape)
    say_runs("eval", backend)
    return backend


def _result_path(args, name: str, suffix: str = ".json") -> Path:
    return stage_dir(_workdir(args), "inference") / f"{name}-{_label(args)}{suffix}"


def _save(args, name: str, result: dict) -> Path:
    return atomic_write_text(_result_path(args, name), json.dumps(result, indent=2, ensure_ascii=False) + "\n")


def _print_scores(result: dict, label: str) -> None:
    print(f"{result['dataset']}, {result['form']}, {result['mode']} {result['shots']}-shot, {label}"
          + (f", first {result['limit']} per subject" if result["limit"] else ""))
    for subject, s in result["subjects"].items():
        print(f"  {subject:45s} {100 * s['accuracy']:6.2f}%  ({s['correct']}/{s['total']})")
    for category, c in result["categories"].items():
        part = f"  ({c['subjects']} of {c['of']} subjects)" if c["subjects"] < c["of"] else ""
        print(f"  {category:45s} {100 * c['accuracy']:6.2f}%{part}")
    print(f"  {'overall (every question)':45s} {100 * result['overall_accuracy']:6.2f}%  ({result['questions']} questions)")


def cmd_eval_mc(args) -> int:
    if args.data:
        bench = open_benchmark(args.eval_command, args.data)
    elif args.eval_command == "ceval":

        folder = stage_dir(_workdir(args), "inference", "ceval-data")
        bench = open_benchmark("ceval", folder if folder.is_dir() else download_ceval(folder, args.subjects))
    else:
        raise EvalDataError(f"--data is required for {args.eval_command}: {DATASETS_HELP[args.eval_command]}")
    plan(bench, args.subjects, args.shots, args.mode)  # every data problem surfaces before the model loads
    name = args.eval_command + ("" if args.mode == "ppl" else f"-{args.mode}")
    journal = Path(args.results) if args.results else _result_path(args, name, ".jsonl")
    if args.restart:
        journal.unlink(missing_ok=True)
    backend = _backend(args, {"all_logits": True})  # a few-shot question: footprint's default context
    tokenizer = load_tokenizer(args.model)
    result = evaluate_benchmark(backend.logits, tokenizer, args.eval_command, bench, subjects=args.subjects,
                                shots=args.shots, limit=args.limit, mode=args.mode, results_path=journal,
                                run_id=f"{args.model}|{args.weights}|{args.seed}|{_label(args)}",
                                progress=not args.no_progress, max_new_tokens=args.max_new_tokens,
                                stop_ids=stop_token_ids(tokenizer))
    result["stage"] = args.stage or _label(args)
    _print_scores(result, _label(args))
    if result["resumed"]:
        print(f"[eval] resumed {result['resumed']} scored questions from {journal}", file=sys.stderr)
    print(f"[eval] wrote {_save(args, name, result)} (per question: {journal})", file=sys.stderr)
    return 0


def cmd_eval_table(args) -> int:
    folder = stage_dir(_workdir(args), "inference")
    name = args.dataset + ("" if args.mode == "ppl" else f"-{args.mode}")
    results = {}
    for path in sorted(folder.glob(f"{name}-*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        if result.get("benchmark") == args.dataset and result.get("mode") == args.mode:
            results[result.get("stage") or path.stem[len(name) + 1:]] = result
    if not results:
        raise EvalDataError(f"{folder} holds no {name}-*.json: run `qwen2lib eval {args.dataset} --data ...` per stage first")
    reference = "fp32 torch" if "fp32 torch" in results else "torch-float32" if "torch-float32" in results else None
    table = accuracy_table(results, reference, categories=True)
    with pd.option_context("display.max_columns", None, "display.width", 250):
        print(table.round(2).to_string())
    return 0


def cmd_eval_ppl(args) -> int:
    text_path = Path(args.text)
    if not text_path.is_file():
        raise EvalDataError(f"{text_path} does not exist: pass a UTF-8 text file")
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EvalDataError(f"{text_path} is not UTF-8 text ({exc.reason} at byte {exc.start}): pass a UTF-8 file") from exc
    backend = _backend(args, {"context": args.max_length, "prompt_tokens": args.max_length, "all_logits": True})
    max_length = min(args.max_length, backend.max_positions)
    stride = args.stride or max_length // 2
    result = text_perplexity(backend.logits, load_tokenizer(args.model), text, max_length, stride)
    result["text"] = str(text_path)
    print(f"perplexity {result['ppl']:.4f} over {result['tokens_scored']} tokens of {text_path.name} "
          f"({result['windows']} windows of {max_length}, stride {stride}, {_label(args)})")
    print(f"[eval] wrote {_save(args, 'ppl-' + text_path.stem, result)}", file=sys.stderr)
    return 0


DATASETS_HELP = {"ceval": "C-Eval val, dev shots (default: download from the hub, online only)",
                 "cmmlu": "CMMLU test, dev shots", "mmlu": "MMLU test, dev shots"}


def register_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy: C-Eval/CMMLU/MMLU the OpenCompass way, or strided perplexity of a text")
    evals = p.add_subparsers(dest="eval_command", required=True)
    for name in DATASETS:
        q = evals.add_parser(name, help=f"{TITLES[name]} accuracy: {DATASETS_HELP[name]}")
        add_model_args(q)
        add_backend_args(q)
        q.add_argument("--stage", default=None, choices=ACCURACY_STAGES,
                       help="score a workbook stage's model (overrides --backend/--precision)")
        q.add_argument("--data", default=None, help="OpenCompassData-core (folder, data/ or zip) or the set's own "
                                                    "release (folder, zip; MMLU's data.tar)")
        q.add_argument("--mode", default="ppl", choices=MODES, help="ppl: lowest answer loss wins (OpenCompass *_ppl); "
                                                                     "gen: greedy, first capital letter")
        q.add_argument("--subjects", nargs="*", default=None)
        q.add_argument("--shots", type=int, default=5, help="dev examples before each question")
        q.add_argument("--limit", "--max-questions", dest="limit", type=int, default=None,
                       help="questions per subject (quick runs)")
        q.add_argument("--results", default=None, help="per-question results file an interrupted run resumes from "
                                                       "(default: <workdir>/inference/<set>-<label>.jsonl)")
        q.add_argument("--restart", action="store_true", help="ignore the results file and score everything again")
        q.add_argument("--max-new-tokens", type=int, default=8, help="gen mode: tokens to find the answer letter in")
        q.add_argument("--no-progress", action="store_true")
        q.set_defaults(func=cmd_eval_mc)
    q = evals.add_parser("table", help="one accuracy table across the stages scored so far, deltas against fp32")
    add_model_args(q)
    q.add_argument("--dataset", default="ceval", choices=DATASETS)
    q.add_argument("--mode", default="ppl", choices=MODES)
    q.set_defaults(func=cmd_eval_table)
    q = evals.add_parser("ppl", help="strided-window perplexity of a text file")
    add_model_args(q)
    add_backend_args(q)
    q.add_argument("--stage", default=None, choices=ACCURACY_STAGES)
    q.add_argument("--text", required=True)
    q.add_argument("--max-length", type=int, default=1024)
    q.add_argument("--stride", type=int, default=None, help="default: max_length // 2")
    q.set_defaults(func=cmd_eval_ppl)

