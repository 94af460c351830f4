"""Accuracy on any backend through one ``ids (B, T) -> logits (B, T, V)`` callable, and the ``eval`` command.

Multiple choice the OpenCompass way (C-Eval, CMMLU, MMLU from their published files, PPL or gen mode,
per-subject and category scores, resumable) lives in ``qwen2lib.evaluation``; this module re-exports
its names, holds the offline stand-in set and strided perplexity, and registers ``qwen2lib eval``.

Perplexity of a text with strided windows, the protocol of the transformers perplexity guide
(wikitext-2): windows of ``max_length`` tokens every ``stride`` tokens, each token scored once,
in the first window that reaches it, with the context before it in that window.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .evaluation.datasets import CHOICES, DATASETS, NOT_CEVAL_MARKER, TITLES, EvalDataError, open_benchmark
from .evaluation.runner import MODES, accuracy_table, evaluate_benchmark, plan
from .evaluation.scoring import build_prompt, continuation_ce, score_gen, score_ppl
from .evaluation.subjects import CEVAL_SUBJECTS

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
__all__ = ["CHOICES", "CEVAL_SUBJECTS", "DATASETS", "NOT_CEVAL_MARKER", "EvalDataError", "accuracy_table",
           "build_prompt", "continuation_ce", "dataset_label", "evaluate_benchmark", "evaluate_ceval",
           "open_benchmark", "score_gen", "score_ppl", "strided_perplexity", "text_perplexity",
           "write_builtin_mc_set"]


def evaluate_ceval(logits_fn: LogitsFn, tokenizer, data_dir, subjects: Sequence[str] | None = None, shots: int = 5,
                   max_questions: int | None = None, progress: bool = True, **kwargs) -> dict:
    """C-Eval val accuracy, ``shots`` examples from dev: ``evaluate_benchmark(..., "ceval", ...)``."""
    return evaluate_benchmark(logits_fn, tokenizer, "ceval", data_dir, subjects=subjects, shots=shots,
                              limit=max_questions, progress=progress, **kwargs)


def dataset_label(data) -> str:
    """What outputs call a C-Eval copy: "C-Eval (val)", or the stand-in's own "not C-Eval: ..." line."""
    return open_benchmark("ceval", data).label


def download_ceval(out_dir: str | Path, subjects: Sequence[str] | None = None) -> Path:
    """Write C-Eval's dev/val CSVs from the hub (``ceval/ceval-exam``) into ``out_dir``; online only."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise EvalDataError("C-Eval is not here and HF_HUB_OFFLINE=1: download ceval-exam.zip "
                            "(https://huggingface.co/datasets/ceval/ceval-exam) and pass --data ceval-exam.zip")
    from datasets import load_dataset

    from .artifacts import atomic_dir

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for subject in subjects or CEVAL_SUBJECTS:
            data = load_dataset("ceval/ceval-exam", name=subject)
            for split in ("dev", "val"):
                (tmp / split).mkdir(exist_ok=True)
                data[split].to_csv(tmp / split / f"{subject}_{split}.csv", index=False)
    return out_dir


# ---- a built-in stand-in ----------------------------------------------------------------------

BUILTIN_MODULES = ("math", "os.path", "statistics")


def write_builtin_mc_set(out_dir: str | Path, modules: Sequence[str] = BUILTIN_MODULES, n_val: int = 8,
                         seed: int = 0) -> Path:
    """A tiny multiple-choice set in C-Eval's CSV layout, NOT C-Eval: which function has this docstring?

    Built from the installed Python's standard library so it works offline; each module is a
    "subject" with 5 dev and ``n_val`` val questions, the distractors drawn from the same module.
    """
    import importlib
    import inspect
    import random

    from .artifacts import atomic_dir

    rng = random.Random(seed)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        mapping = {}
        for module_name in modules:
            module = importlib.import_module(module_name)
            functions = []
            for name in sorted(dir(module)):
                obj = getattr(module, name)
                doc = (inspect.getdoc(obj) or "").strip().splitlines()
                if name.startswith("_") or not callable(obj) or inspect.isclass(obj) or not doc:
                    continue
                line = doc[0].strip()
                if len(line) > 12 and name not in line:
                    functions.append((name, line))
            rng.shuffle(functions)
            if len(functions) < 5 + n_val:
                raise ValueError(f"{module_name} has only {len(functions)} documented functions; "
                                 f"{5 + n_val} are needed")
            subject = "not_ceval_" + module_name.replace(".", "_")
            mapping[subject] = [f"Python {module_name} (not C-Eval)", f"Python标准库{module_name}", "NOT C-EVAL"]
            questions = functions[: 5 + n_val]
            for split, rows in (("dev", questions[:5]), ("val", questions[5:])):
                with open(tmp / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as fh:
                    writer = csv.writer(fh)
                    writer.writerow(["id", "question", *CHOICES, "answer"])
                    for i, (name, line) in enumerate(rows):
                        others = rng.sample([f for f, _ in functions if f != name], 3)
                        slot = rng.randrange(4)
                        options = others[:slot] + [name] + others[slot:]
                        writer.writerow([i, f"`{module_name}` 中哪个函数的文档字符串是：“{line}”", *options, CHOICES[slot]])
        (tmp / "subject_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False, indent=1), encoding="utf-8")
        (tmp / NOT_CEVAL_MARKER).write_text(
            "not C-Eval: built-in stdlib-docstring multiple choice in the C-Eval CSV layout\n"
            "Written by qwen2lib.evaluate.write_builtin_mc_set because no C-Eval files were given (offline).\n",
            encoding="utf-8")
    return out_dir


# ---- perplexity -------------------------------------------------------------------------------

@torch.no_grad()
def strided_perplexity(logits_fn: LogitsFn, ids: Sequence[int] | torch.Tensor, max_length: int = 1024,
                       stride: int = 512) -> dict:
    """Perplexity of one token sequence with sliding windows; each token scored once, with context.

    Window k covers [k * stride, k * stride + max_length); only the tokens no earlier window scored
    count, so every token but the first is scored exactly once. stride == max_length gives disjoint
    windows (cheap, each window's first token unscored); smaller strides give more context.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if not 0 < stride <= max_length:
        raise ValueError(f"stride={stride} must be in 1..max_length={max_length}, or tokens go unscored")
    if len(ids) < 2:
        raise ValueError("need at least 2 tokens to score")
    nll_sum, scored, windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = ids[begin:end]
        new = min(end - prev_end, len(window) - 1)  # the window's first token has no context in it
        logits = logits_fn(window[None])[0].float()  # (W, V)
        nll = F.cross_entropy(logits[-new - 1:-1], window[-new:], reduction="sum")
        nll_sum, scored, windows, prev_end = nll_sum + float(nll), scored + new, windows + 1, end
        if end == len(ids):
            break
    mean = nll_sum / scored
    return {"ppl": math.exp(mean), "nll": mean, "tokens_scored": scored, "windows": windows,
            "max_length": max_length, "stride": stride}


def text_perplexity(logits_fn: LogitsFn, tokenizer, text: str, max_length: int = 1024, stride: int = 512) -> dict:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return {**strided_perplexity(logits_fn, ids, max_length, stride), "tokens": len(ids)}


# ---- command line -----------------------------------------------------------------------------

def _workdir(args):
    from .cli import workdir_of

    return workdir_of(args)


def _label(args) -> str:
    if getattr(args, "stage", None):
        return args.stage.replace(" ", "-")
    from .longctx import long_context_of, workdir_tag

    tag = workdir_tag(long_context_of(args))  # a --dca/--yarn run is its own result, not the plain one's
    return args.backend + (f"-{args.precision}" if args.backend == "onnx" else f"-{args.dtype}") + (f"-{tag}" if tag else "")


def _backend(args):
    from .generation import load_backend, stage_backend
    from .longctx import long_context_of

    long_context = long_context_of(args)  # refuses --dca/--yarn with --stage
    if getattr(args, "stage", None):
        return stage_backend(args.stage, args.model, weights=args.weights, workdir=_workdir(args), seed=args.seed,
                             dtype=args.dtype)
    return load_backend(args.model, args.backend, weights=args.weights, dtype=args.dtype, seed=args.seed,
                        compiled=args.compiled, workdir=_workdir(args), precision=args.precision,
                        long_context=long_context)


def _result_path(args, name: str, suffix: str = ".json") -> Path:
    from .artifacts import stage_dir

    return stage_dir(_workdir(args), "inference") / f"{name}-{_label(args)}{suffix}"


def _save(args, name: str, result: dict) -> Path:
    from .artifacts import atomic_write_text

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
    from .generation import stop_token_ids
    from .tokenizer import load_tokenizer

    if args.data:
        bench = open_benchmark(args.eval_command, args.data)
    elif args.eval_command == "ceval":
        from .artifacts import stage_dir

        folder = stage_dir(_workdir(args), "inference", "ceval-data")
        bench = open_benchmark("ceval", folder if folder.is_dir() else download_ceval(folder, args.subjects))
    else:
        raise EvalDataError(f"--data is required for {args.eval_command}: {DATASETS_HELP[args.eval_command]}")
    plan(bench, args.subjects, args.shots, args.mode)  # every data problem surfaces before the model loads
    name = args.eval_command + ("" if args.mode == "ppl" else f"-{args.mode}")
    journal = Path(args.results) if args.results else _result_path(args, name, ".jsonl")
    if args.restart:
        journal.unlink(missing_ok=True)
    backend = _backend(args)
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
    import pandas as pd

    from .artifacts import stage_dir

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
    from .tokenizer import load_tokenizer

    text_path = Path(args.text)
    if not text_path.is_file():
        raise EvalDataError(f"{text_path} does not exist: pass a UTF-8 text file")
    backend = _backend(args)
    max_length = min(args.max_length, backend.max_positions)
    stride = args.stride or max_length // 2
    result = text_perplexity(backend.logits, load_tokenizer(args.model), text_path.read_text(encoding="utf-8"),
                             max_length, stride)
    result["text"] = str(text_path)
    print(f"perplexity {result['ppl']:.4f} over {result['tokens_scored']} tokens of {text_path.name} "
          f"({result['windows']} windows of {max_length}, stride {stride}, {_label(args)})")
    print(f"[eval] wrote {_save(args, 'ppl-' + text_path.stem, result)}", file=sys.stderr)
    return 0


DATASETS_HELP = {"ceval": "C-Eval val, dev shots (default: download from the hub, online only)",
                 "cmmlu": "CMMLU test, dev shots", "mmlu": "MMLU test, dev shots"}


def register_cli(sub) -> None:
    from .cli import add_model_args
    from .generation import ACCURACY_STAGES, add_backend_args

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
