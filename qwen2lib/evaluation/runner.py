"""Score a benchmark copy subject by subject, resumably, and put every stage's scores in one table.

Each scored question is appended as one JSON line to a results file (``results_path``); a run that
finds the file with the same run key (set, copy, split, mode, shots, model) skips the questions it
holds, so an interrupted run of MMLU's 14k test questions picks up where it stopped. The file is
append-only on purpose: a kill loses at most the line being written, and reading ignores a torn last line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

from tqdm.auto import tqdm

from .datasets import SHOT_SPLIT, Benchmark, EvalDataError, open_benchmark
from .scoring import LogitsFn, build_prompt, score_gen, score_ppl
from .subjects import category_scores

MODES = ("ppl", "gen")


def plan(bench: Benchmark, subjects: Sequence[str] | None, shots: int, mode: str = "ppl") -> list[str]:
    """The subjects to score, checked against the files before any model is loaded."""
    if mode not in MODES:
        raise EvalDataError(f"mode={mode!r}: one of {', '.join(MODES)}")
    available = bench.subjects()
    chosen = list(subjects) if subjects else available
    unknown = [s for s in chosen if s not in available]
    if unknown:
        shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
        raise EvalDataError(f"{bench.path}: no {bench.split} file for {', '.join(unknown)} in the {bench.form}; "
                            f"it has {len(available)} subjects ({shown})")
    if shots < 0:
        raise EvalDataError(f"shots={shots}: 0 or more dev examples")
    if shots:
        lacking = [s for s in chosen if not bench.has(s, SHOT_SPLIT)]
        if lacking:
            raise EvalDataError(f"{bench.path}: {shots}-shot needs the dev split, missing for {', '.join(lacking[:5])}; "
                                "pass --shots 0")
    return chosen


def _read_journal(path: Path, key: dict) -> dict[tuple[str, int], dict]:
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        if not lines or json.loads(lines[0]).get("run") != key:
            return {}  # another run's file: start over rather than mix scores
    except json.JSONDecodeError:
        return {}
    done = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the torn line of a killed run
            continue
        done[(record["subject"], record["index"])] = record
    return done


def _summary(bench: Benchmark, records: list[dict], subjects: list[str]) -> dict:
    per_subject = {}
    for subject in subjects:
        mine = [r for r in records if r["subject"] == subject]
        correct = sum(r["prediction"] == r["answer"] for r in mine)
        per_subject[subject] = {"accuracy": correct / len(mine) if mine else 0.0, "correct": correct,
                                "total": len(mine)}
    total = sum(s["total"] for s in per_subject.values())
    categories = category_scores(bench.dataset, {s: v["accuracy"] for s, v in per_subject.items() if v["total"]})
    return {"subjects": per_subject, "categories": categories, "questions": total,
            "overall_accuracy": sum(s["correct"] for s in per_subject.values()) / max(1, total),  # every question once
            "average_accuracy": categories.get("Average", {}).get("accuracy", 0.0)}  # OpenCompass's headline mean


def evaluate_benchmark(logits_fn: LogitsFn, tokenizer, dataset: str, data, *, subjects: Sequence[str] | None = None,
                       shots: int = 5, limit: int | None = None, mode: str = "ppl", results_path=None,
                       run_id: str = "", progress: bool = True, max_new_tokens: int = 8, stop_ids=()) -> dict:
    """Accuracy of one model on ``dataset`` (ceval | cmmlu | mmlu) read from ``data`` (a path or a Benchmark).

    ``limit``: questions per subject (quick runs); ``shots``: dev examples before each question;
    ``results_path``: the resumable per-question file; ``run_id`` names the model in its run key.
    """
    bench = data if isinstance(data, Benchmark) else open_benchmark(dataset, data)
    chosen = plan(bench, subjects, shots, mode)
    key = {"dataset": bench.dataset, "source": str(Path(bench.path).resolve()), "root": bench.group.root,
           "split": bench.split, "mode": mode, "shots": shots, "model": run_id}
    journal = Path(results_path) if results_path else None
    done = _read_journal(journal, key) if journal else {}
    if journal:
        journal.parent.mkdir(parents=True, exist_ok=True)
        if not done:
            journal.write_text(json.dumps({"run": key}) + "\n", encoding="utf-8")
    work = {s: bench.rows(s, bench.split)[:limit] for s in chosen}
    todo = sum(1 for s, rows in work.items() for i in range(len(rows)) if (s, i) not in done)
    records = []
    with tqdm(total=todo, desc=f"{bench.dataset} {mode}", disable=not progress, file=sys.stderr) as bar, \
            (open(journal, "a", encoding="utf-8") if journal else _NoFile()) as out:
        for subject, rows in work.items():
            dev = bench.rows(subject, SHOT_SPLIT)[:shots] if shots else []
            for i, row in enumerate(rows):
                if row["answer"] is None:
                    raise EvalDataError(f"{bench.path}: {subject} {bench.split} row {i} has no answer to score against")
                record = done.get((subject, i))
                if record is None:
                    prompt = build_prompt(bench.dataset, bench.names.get(subject, subject), dev, row)
                    scored = (score_ppl(logits_fn, tokenizer, prompt) if mode == "ppl"
                              else score_gen(logits_fn, tokenizer, prompt, max_new_tokens, stop_ids))
                    record = {"subject": subject, "index": i, "id": row.get("id"), "answer": row["answer"], **scored}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    out.flush()
                    bar.update(1)
                records.append(record)
    return {"dataset": bench.label, "benchmark": bench.dataset, "split": bench.split, "form": bench.form,
            "source": str(bench.path), "mode": mode, "shots": shots, "limit": limit, "resumed": len(done),
            **_summary(bench, records, chosen), "predictions": records}


class _NoFile:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, text):
        pass

    def flush(self):
        pass


def accuracy_table(results: Mapping[str, Mapping], reference: str | None = None, categories: bool = False):
    """One row per stage: each benchmark's average accuracy (%) and its delta against the reference row.

    ``results``: stage label -> an ``evaluate_benchmark`` result, or -> {name: result} for several sets;
    columns are named by each result's dataset label, so the offline stand-in never reads as C-Eval.
    The reference is ``reference`` or the first stage (fp32 torch); deltas are percentage points, the way
    Qwen publishes its quantized models' scores against bf16. ``categories`` adds OpenCompass's category columns.
    """
    import pandas as pd  # heavy and optional: only this function needs it

    if not results:
        raise ValueError("no results to tabulate")
    reference = reference or next(iter(results))
    if reference not in results:
        raise ValueError(f"reference {reference!r} is not one of {', '.join(results)}")

    def scores(result: Mapping) -> dict[str, float]:
        out = {}
        for r in ([result] if "categories" in result else result.values()):
            title = r["dataset"].split(":")[0]  # "C-Eval (val)", "MMLU (test)", or "not C-Eval" for the stand-in
            out[f"{title} avg %"] = 100 * r["average_accuracy"]
            if categories:
                out.update({f"{title} {c} %": 100 * v["accuracy"] for c, v in r["categories"].items() if c != "Average"})
        return out

    table = pd.DataFrame({label: scores(r) for label, r in results.items()}).T
    ref = table.loc[reference]
    for column in [c for c in table.columns if c.endswith(" avg %")]:
        table[column.replace(" avg %", f" Δ vs {reference}")] = table[column] - ref[column]
    return table
