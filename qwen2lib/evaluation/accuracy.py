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
import importlib
import inspect
import json
import math
import os
import random
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from datasets import load_dataset

from ..artifacts import atomic_dir
from ..errors import BadInputError
from .datasets import CHOICES, DATASETS, NOT_CEVAL_MARKER, TITLES, EvalDataError, open_benchmark
from .runner import MODES, accuracy_table, evaluate_benchmark, plan
from .scoring import build_prompt, continuation_ce, score_gen, score_ppl
from .subjects import CEVAL_SUBJECTS

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
__all__ = ["CHOICES", "CEVAL_SUBJECTS", "DATASETS", "MODES", "TITLES", "NOT_CEVAL_MARKER", "EvalDataError", "accuracy_table",
           "build_prompt", "continuation_ce", "dataset_label", "evaluate_benchmark", "evaluate_ceval",
           "open_benchmark", "plan", "score_gen", "score_ppl", "strided_perplexity", "text_perplexity",
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
            "Written by qwen2lib.evaluation.accuracy.write_builtin_mc_set because no C-Eval files were given (offline).\n",
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
        raise BadInputError(f"stride={stride} must be in 1..max_length={max_length}, or tokens go unscored")
    if len(ids) < 2:
        raise BadInputError("need at least 2 tokens to score: the text is too short")
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
