"""Accuracy on either backend through one ``ids (B, T) -> logits (B, T, V)`` callable.

C-Eval the way OpenCompass scores it in PPL mode (its ``ceval_ppl`` config on a base model with no
meta template): the published CSV layout (``{subject}_dev.csv`` gives the 5 in-context examples,
``{subject}_val.csv`` is scored), the Chinese exam prompt, and for each question four texts that end
in A, B, C or D; the candidate whose answer continuation has the lowest mean token cross-entropy
wins. OpenCompass averages over the whole text instead; with single-token answers sharing one
prefix both pick the same letter, and scoring only the continuation lets one forward pass over the
shared prefix score all four.

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

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
CHOICES = ("A", "B", "C", "D")
NOT_CEVAL_MARKER = "NOT_CEVAL.txt"

# subject -> Chinese name, as in C-Eval's subject_mapping.json (used in the exam prompt).
CEVAL_SUBJECTS = {
    "computer_network": "计算机网络", "operating_system": "操作系统", "computer_architecture": "计算机组成",
    "college_programming": "大学编程", "college_physics": "大学物理", "college_chemistry": "大学化学",
    "advanced_mathematics": "高等数学", "probability_and_statistics": "概率统计", "discrete_mathematics": "离散数学",
    "electrical_engineer": "注册电气工程师", "metrology_engineer": "注册计量师", "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理", "high_school_chemistry": "高中化学", "high_school_biology": "高中生物",
    "middle_school_mathematics": "初中数学", "middle_school_biology": "初中生物", "middle_school_physics": "初中物理",
    "middle_school_chemistry": "初中化学", "veterinary_medicine": "兽医学", "college_economics": "大学经济学",
    "business_administration": "工商管理", "marxism": "马克思主义基本原理",
    "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论", "education_science": "教育学",
    "teacher_qualification": "教师资格", "high_school_politics": "高中政治", "high_school_geography": "高中地理",
    "middle_school_politics": "初中政治", "middle_school_geography": "初中地理", "modern_chinese_history": "近代史纲要",
    "ideological_and_moral_cultivation": "思想道德修养与法律基础", "logic": "逻辑学", "law": "法学",
    "chinese_language_and_literature": "中国语言文学", "art_studies": "艺术学", "professional_tour_guide": "导游资格",
    "legal_professional": "法律职业资格", "high_school_chinese": "高中语文", "high_school_history": "高中历史",
    "middle_school_history": "初中历史", "civil_servant": "公务员", "sports_science": "体育学",
    "plant_protection": "植物保护", "basic_medicine": "基础医学", "clinical_medicine": "临床医学",
    "urban_and_rural_planner": "注册城乡规划师", "accountant": "注册会计师", "fire_engineer": "注册消防工程师",
    "environmental_impact_assessment_engineer": "环境影响评价工程师", "tax_accountant": "税务师", "physician": "医师资格",
}


# ---- C-Eval files -----------------------------------------------------------------------------

def _csv_path(data_dir: Path, subject: str, split: str) -> Path | None:
    for path in (data_dir / f"{subject}_{split}.csv", data_dir / split / f"{subject}_{split}.csv"):
        if path.is_file():
            return path
    return None


def ceval_subjects(data_dir: str | Path) -> list[str]:
    """Subjects with a ``{subject}_val.csv`` in the folder (flat, or in a ``val/`` subfolder)."""
    data_dir = Path(data_dir)
    found = {p.name.removesuffix("_val.csv") for p in list(data_dir.glob("*_val.csv")) + list(data_dir.glob("val/*_val.csv"))}
    return sorted(found)


def read_ceval_csv(path: str | Path) -> list[dict]:
    """Rows of a C-Eval CSV (id, question, A, B, C, D, answer[, explanation])."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    missing = [c for c in ("question", *CHOICES, "answer") if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; C-Eval CSVs have id,question,A,B,C,D,answer")
    bad = [r.get("id", i) for i, r in enumerate(rows) if r["answer"].strip() not in CHOICES]
    if bad:
        raise ValueError(f"{path}: answer must be one of A/B/C/D (rows {bad[:5]})")
    return rows


def subject_names(data_dir: str | Path) -> dict[str, str]:
    """subject -> Chinese name: the folder's ``subject_mapping.json`` if present, else C-Eval's table."""
    names = dict(CEVAL_SUBJECTS)
    mapping = Path(data_dir) / "subject_mapping.json"
    if mapping.is_file():
        names.update({k: v[1] for k, v in json.loads(mapping.read_text(encoding="utf-8")).items()})
    return names


def dataset_label(data_dir: str | Path) -> str:
    marker = Path(data_dir) / NOT_CEVAL_MARKER
    return marker.read_text(encoding="utf-8").splitlines()[0] if marker.is_file() else "C-Eval (val)"


# ---- prompts ----------------------------------------------------------------------------------

def ceval_question(subject_zh: str, row: dict) -> str:
    """One exam question up to the answer, OpenCompass's C-Eval template."""
    return (f"以下是中国关于{subject_zh}考试的单项选择题，请选出其中的正确答案。\n{row['question']}\n"
            f"A. {row['A']}\nB. {row['B']}\nC. {row['C']}\nD. {row['D']}\n答案: ")


def ceval_context(subject_zh: str, shots: Sequence[dict], row: dict) -> str:
    """In-context examples then the question; the answer letter is appended after one more newline.

    Without a meta template OpenCompass joins every piece (each example's question, its answer,
    the test question, the candidate answer) with a newline.
    """
    pieces = []
    for shot in shots:
        pieces += [ceval_question(subject_zh, shot), shot["answer"].strip()]
    pieces.append(ceval_question(subject_zh, row))
    return "\n".join(pieces)


def candidate_text(context: str, choice: str) -> str:
    return context + "\n" + choice


# ---- scoring ----------------------------------------------------------------------------------

def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def continuation_ce(logits_fn: LogitsFn, context_ids: list[int], candidates: list[list[int]]) -> list[float]:
    """Mean cross-entropy of each candidate's tokens after the context.

    ``candidates`` are whole tokenisations (context + answer): the answer's first token can merge
    with the context's last, so a candidate's continuation starts where it stops agreeing with
    the context's own tokenisation.
    """
    starts = [max(1, _common_prefix(context_ids, c)) for c in candidates]
    if any(s >= len(c) for s, c in zip(starts, candidates)):
        raise ValueError("a candidate adds no tokens to the context")
    shared = min(_common_prefix(candidates[0], c) for c in candidates)
    first = min(starts) - 1  # logits before this row predict no continuation token: skip their softmax
    if all(len(c) == shared + 1 for c in candidates):
        # They differ in the last token only: one pass over the shared prefix scores all of them.
        logits = logits_fn(torch.tensor([candidates[0][:shared]]))[0, first:]  # (shared - first, V)
        rows = [F.log_softmax(logits.float(), -1)] * len(candidates)
    else:
        rows = [F.log_softmax(logits_fn(torch.tensor([c]))[0, first:].float(), -1) for c in candidates]
    scores = []
    for c, s, logp in zip(candidates, starts, rows):
        targets = torch.tensor(c[s:])
        scores.append(float(-logp[s - 1 - first:len(c) - 1 - first].gather(-1, targets[:, None]).mean()))
    return scores


def score_question(logits_fn: LogitsFn, tokenizer, context: str, choices: Sequence[str] = CHOICES) -> dict:
    """{"ce": [mean CE per choice], "prediction": the lowest-CE choice}."""
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    candidates = [tokenizer.encode(candidate_text(context, c), add_special_tokens=False) for c in choices]
    ce = continuation_ce(logits_fn, context_ids, candidates)
    return {"ce": ce, "prediction": choices[min(range(len(ce)), key=ce.__getitem__)]}


def evaluate_ceval(logits_fn: LogitsFn, tokenizer, data_dir: str | Path, subjects: Sequence[str] | None = None,
                   shots: int = 5, max_questions: int | None = None, progress: bool = True) -> dict:
    """Per-subject and overall accuracy on the ``val`` split, ``shots`` examples from ``dev``."""
    from tqdm.auto import tqdm

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} is not a folder: pass a folder of C-Eval CSVs ({{subject}}_dev.csv, "
                                "{subject}_val.csv), e.g. the unzipped ceval-exam.zip")
    available = ceval_subjects(data_dir)
    subjects = list(subjects) if subjects else available
    unknown = [s for s in subjects if s not in available]
    if not subjects or unknown:
        raise FileNotFoundError(f"{data_dir}: no {{subject}}_val.csv for {', '.join(unknown) or 'any subject'}; "
                                f"found: {', '.join(available) or 'none'}")
    names = subject_names(data_dir)
    per_subject, predictions = {}, []
    for subject in subjects:
        val = read_ceval_csv(_csv_path(data_dir, subject, "val"))[:max_questions]
        dev_path = _csv_path(data_dir, subject, "dev")
        if shots and dev_path is None:
            raise FileNotFoundError(f"{data_dir}: {subject}_dev.csv is missing ({shots}-shot needs it); pass shots=0")
        dev = read_ceval_csv(dev_path)[:shots] if shots else []
        correct = 0
        for row in tqdm(val, desc=subject, disable=not progress, file=sys.stderr, leave=False):
            scored = score_question(logits_fn, tokenizer, ceval_context(names.get(subject, subject), dev, row))
            hit = scored["prediction"] == row["answer"].strip()
            correct += hit
            predictions.append({"subject": subject, "id": row.get("id"), "answer": row["answer"].strip(), **scored})
        per_subject[subject] = {"accuracy": correct / len(val), "correct": correct, "total": len(val)}
    total = sum(s["total"] for s in per_subject.values())
    return {
        "dataset": dataset_label(data_dir),
        "shots": shots,
        "subjects": per_subject,
        "overall_accuracy": sum(s["correct"] for s in per_subject.values()) / total,  # every question counts once
        "average_accuracy": sum(s["accuracy"] for s in per_subject.values()) / len(per_subject),  # OpenCompass's mean
        "questions": total,
        "predictions": predictions,
    }


def download_ceval(out_dir: str | Path, subjects: Sequence[str] | None = None) -> Path:
    """Write C-Eval's dev/val CSVs from the hub (``ceval/ceval-exam``) into ``out_dir``; online only."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError("C-Eval is not here and HF_HUB_OFFLINE=1: download ceval-exam.zip "
                                "(https://huggingface.co/datasets/ceval/ceval-exam), unzip it and pass --data DIR")
    from datasets import load_dataset

    from .artifacts import atomic_dir

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for subject in subjects or CEVAL_SUBJECTS:
            data = load_dataset("ceval/ceval-exam", name=subject)
            for split in ("dev", "val"):
                data[split].to_csv(tmp / f"{subject}_{split}.csv", index=False)
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

def _backend_logits(args):
    from .generation import load_backend

    backend = load_backend(args.model, args.backend, weights=args.weights, dtype=args.dtype, seed=args.seed,
                           compiled=args.compiled, workdir=_workdir(args), precision=args.precision)
    return backend, backend.logits


def _workdir(args):
    from .cli import workdir_of

    return workdir_of(args)


def _label(args) -> str:
    return args.backend + (f"-{args.precision}" if args.backend == "onnx" else f"-{args.dtype}")


def _save(args, name: str, result: dict) -> Path:
    from .artifacts import atomic_write_text, stage_dir

    path = stage_dir(_workdir(args), "inference") / f"{name}-{_label(args)}.json"
    return atomic_write_text(path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")


def cmd_eval_ceval(args) -> int:
    from .tokenizer import load_tokenizer

    data = Path(args.data) if args.data else None
    if data is None:
        from .artifacts import stage_dir

        data = stage_dir(_workdir(args), "inference", "ceval-data")
        if not data.is_dir():
            download_ceval(data, args.subjects)
    _, logits_fn = _backend_logits(args)
    result = evaluate_ceval(logits_fn, load_tokenizer(args.model), data, args.subjects, args.shots, args.max_questions)
    print(f"{result['dataset']}, {result['shots']}-shot, {_label(args)}")
    for subject, s in result["subjects"].items():
        print(f"  {subject:45s} {100 * s['accuracy']:6.2f}%  ({s['correct']}/{s['total']})")
    print(f"  {'overall (every question)':45s} {100 * result['overall_accuracy']:6.2f}%  ({result['questions']} questions)")
    print(f"  {'average over subjects':45s} {100 * result['average_accuracy']:6.2f}%")
    print(f"[eval] wrote {_save(args, 'ceval', result)}", file=sys.stderr)
    return 0


def cmd_eval_ppl(args) -> int:
    from .tokenizer import load_tokenizer

    text_path = Path(args.text)
    if not text_path.is_file():
        raise FileNotFoundError(f"{text_path} does not exist: pass a UTF-8 text file")
    backend, logits_fn = _backend_logits(args)
    max_length = min(args.max_length, backend.max_positions)
    stride = args.stride or max_length // 2
    result = text_perplexity(logits_fn, load_tokenizer(args.model), text_path.read_text(encoding="utf-8"),
                             max_length, stride)
    result["text"] = str(text_path)
    print(f"perplexity {result['ppl']:.4f} over {result['tokens_scored']} tokens of {text_path.name} "
          f"({result['windows']} windows of {max_length}, stride {stride}, {_label(args)})")
    print(f"[eval] wrote {_save(args, 'ppl-' + text_path.stem, result)}", file=sys.stderr)
    return 0


def register_cli(sub) -> None:
    from .cli import add_model_args
    from .generation import add_backend_args

    p = sub.add_parser("eval", help="accuracy: C-Eval (OpenCompass PPL mode) or strided perplexity of a text file")
    evals = p.add_subparsers(dest="eval_command", required=True)
    for name, func, help_text in (("ceval", cmd_eval_ceval, "C-Eval val accuracy, 5-shot, lowest answer CE wins"),
                                  ("ppl", cmd_eval_ppl, "strided-window perplexity of a text file")):
        q = evals.add_parser(name, help=help_text)
        add_model_args(q)
        add_backend_args(q)
        if name == "ceval":
            q.add_argument("--data", default=None, help="folder of {subject}_dev.csv/{subject}_val.csv; "
                                                        "default: download from the hub (online only)")
            q.add_argument("--subjects", nargs="*", default=None)
            q.add_argument("--shots", type=int, default=5)
            q.add_argument("--max-questions", type=int, default=None, help="per subject (quick runs)")
        else:
            q.add_argument("--text", required=True)
            q.add_argument("--max-length", type=int, default=1024)
            q.add_argument("--stride", type=int, default=None, help="default: max_length // 2")
        q.set_defaults(func=func)
