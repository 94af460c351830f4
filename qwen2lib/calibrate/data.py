"""Calibration text: the three sets the deployment guide names, in their published layouts, plus an offline one.

  c4       allenai/c4 English shards: ``c4-train.00000-of-01024.json.gz`` / ``c4-validation.0000X-of-00008.json.gz``,
           JSON lines with a ``text`` field (a file, or a folder holding such shards)
  ceval    ceval/ceval-exam: ``ceval-exam.zip`` or its extracted ``{dev,val,test}/{subject}_{split}.csv``,
           columns id,question,A,B,C,D[,answer,explanation] (a zip, a folder, OpenCompassData-core, or one
           csv); the dev and test splits only, since ``eval ceval`` scores val
  alpaca   yahma/alpaca-cleaned: ``alpaca_data_cleaned.json``, a list of {instruction, input, output}
  builtin  no download at all: the CPython standard library's own sources (the *train* files of
           ``qwen2lib.model.corpus``), labelled as an offline fallback wherever it is used; the default for the
           embedded models, which learned that code
  prose    no download at all: the READMEs of the installed Python packages (the *train* packages of
           ``qwen2lib.model.corpus.prose_corpus``), English technical prose; the default for every other model

Files are read with ``datasets`` (its json / csv builders) from a local path; with no path the hub is
used only when online (``HF_HUB_OFFLINE`` is not 1). Instruct models see every sample rendered with
their chat template, as they will at run time.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import load_dataset
from huggingface_hub import hf_hub_download

from ..model.corpus import prose_corpus, stdlib_corpus
from ..errors import BadInputError, Qwen2LibError
from ..evaluation.datasets import SCORED_SPLIT, EvalDataError, open_benchmark
from ..evaluation.scoring import build_prompt

DATASETS = ("c4", "ceval", "alpaca", "builtin", "prose")
OFFLINE = ("builtin", "prose")  # sets every install has: nothing to download, no path to give
HUB = {  # repo id and the one file of it the guide calibrates on
    "c4": ("allenai/c4", "en/c4-train.00000-of-01024.json.gz"),
    "ceval": ("ceval/ceval-exam", "ceval-exam.zip"),
    "alpaca": ("yahma/alpaca-cleaned", "alpaca_data_cleaned.json"),
}
CEVAL_SPLITS = ("dev", "test")  # never val: `eval ceval` scores it
BUILTIN_LABEL = "builtin: CPython standard library sources (train files), offline fallback, nothing downloaded"
PROSE_LABEL = ("prose: the READMEs of the installed Python packages (train packages), English technical prose, "
               "offline, nothing downloaded")


class CalibrationDataError(Qwen2LibError, FileNotFoundError):
    """The calibration set cannot be read: no files where pointed, an unknown layout, or offline without files."""


@dataclass(frozen=True)
class CalibrationTexts:
    dataset: str  # c4 | ceval | alpaca | builtin
    label: str  # what every output calls this data
    source: str  # the file/folder/hub id it came from
    texts: list[str]
    fallback: bool = False  # True: builtin stood in for an unavailable set


def hub_online() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes") and \
        os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() not in ("1", "true", "yes")


def _load(builder: str, files: list[str]):
    return load_dataset(builder, data_files=[str(f) for f in files], split="train")


# ---- one reader per layout: path -> list of records --------------------------------------------


def read_c4(path: Path) -> list[dict]:
    files = sorted(path.glob("c4-*.json.gz")) + sorted(path.glob("*.json")) + sorted(path.glob("*.jsonl")) \
        if path.is_dir() else [path]
    if not files:
        raise CalibrationDataError(f"{path} holds no c4 shard (c4-train.00000-of-01024.json.gz or c4-validation.*.json.gz)")
    data = _load("json", files)
    if "text" not in data.column_names:
        raise CalibrationDataError(f"{files[0]} has no 'text' field (columns: {data.column_names}): is it a c4 shard?")
    return [{"text": t} for t in data["text"]]


def read_ceval(path: Path) -> list[dict]:
    """C-Eval rows of every split but the one ``eval ceval`` scores (val): dev and test.

    Read by the evaluation's reader, so every layout it accepts works here too (ceval-exam.zip, its folder,
    OpenCompassData-core); calibrating on val would tune the quantized model on the questions that grade it.
    """
    scored = SCORED_SPLIT["ceval"]
    if path.name.endswith(f"_{scored}.csv"):
        raise CalibrationDataError(f"{path} is C-Eval's {scored} split, which `eval ceval` scores: calibrate on the "
                                   "dev/test files or the whole ceval-exam.zip")
    try:
        bench = open_benchmark("ceval", path, need_split=None)
    except EvalDataError as error:
        raise CalibrationDataError(str(error)) from None
    splits = [s for s in CEVAL_SPLITS if s in bench.group.splits()]
    if not splits:
        raise CalibrationDataError(f"{path} holds only C-Eval's {scored} split, which `eval ceval` scores: "
                                   f"calibration needs {' or '.join(CEVAL_SPLITS)}")
    return [{**row, "subject_name": bench.names.get(subject, subject)}
            for split in splits for subject in bench.subjects(split) for row in bench.rows(subject, split)]


def read_alpaca(path: Path) -> list[dict]:
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise CalibrationDataError(f"{path} holds no alpaca json (alpaca_data_cleaned.json)")
    data = _load("json", files)
    missing = {"instruction", "output"} - set(data.column_names)
    if missing:
        raise CalibrationDataError(f"{files[0]} lacks the alpaca fields {sorted(missing)} (has {data.column_names})")
    return [dict(row) for row in data]


READERS = {"c4": read_c4, "ceval": read_ceval, "alpaca": read_alpaca}


def read_hub(dataset: str) -> list[dict]:
    repo, filename = HUB[dataset]
    local = hf_hub_download(repo, filename, repo_type="dataset")
    return READERS[dataset](Path(local))


# ---- records -> (user, assistant) turns -> text ------------------------------------------------


def turns(dataset: str, record: dict) -> tuple[str, str]:
    """(prompt, answer) of one record; plain-text sets are all prompt."""
    if dataset == "ceval":  # the exam prompt `eval ceval` asks with, so calibration sees what is scored
        answer = " ".join(str(record.get(k) or "") for k in ("answer", "explanation")).strip()
        return build_prompt("ceval", record["subject_name"], [], record), answer
    if dataset == "alpaca":
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return prompt, record.get("output") or ""
    return record["text"], ""


def render(dataset: str, record: dict, tokenizer=None, chat: bool = False) -> str:
    prompt, answer = turns(dataset, record)
    if not chat:
        return f"{prompt}{answer}" if dataset == "ceval" else "\n\n".join(p for p in (prompt, answer) if p)
    messages = [{"role": "user", "content": prompt.rstrip()}] + ([{"role": "assistant", "content": answer}] if answer else [])
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not answer)


def builtin_records(dataset: str = "builtin") -> tuple[str, list[dict]]:
    """An offline set's source and records: the stdlib's train files ("builtin"), or the train packages' READMEs."""
    corpus = prose_corpus(seed=0) if dataset == "prose" else stdlib_corpus(seed=0)
    return str(corpus.root), [{"text": corpus.read(f)} for f in corpus.train_files]


def load_calibration_texts(dataset: str = "builtin", data_path: str | os.PathLike | None = None, *,
                           tokenizer=None, chat: bool = False, fallback: bool = True) -> CalibrationTexts:
    """The calibration set's texts, rendered (with the chat template when ``chat``).

    ``data_path``: the local file/folder in the set's published layout. Without it the hub is tried when
    online; offline (or with the hub failing) ``fallback=True`` substitutes ``builtin`` and says so in the
    label, ``fallback=False`` raises CalibrationDataError.
    """
    if dataset not in DATASETS:
        raise CalibrationDataError(f"dataset={dataset!r}: choose one of {', '.join(DATASETS)}")
    if chat and tokenizer is None:
        raise ValueError("chat=True needs the tokenizer (its chat template renders the samples)")
    is_fallback, label = False, dataset
    if dataset in OFFLINE:
        source, records = builtin_records(dataset)
        label = BUILTIN_LABEL if dataset == "builtin" else PROSE_LABEL
    elif data_path is not None:
        path = Path(data_path).expanduser()
        if not path.exists():
            raise CalibrationDataError(f"{path} does not exist: point --data-path at the {dataset} file or folder "
                                       f"({HUB[dataset][1]} in its published layout)")
        source, records = str(path), READERS[dataset](path)
        label = f"{dataset} ({path.name})"
    else:
        reason = None
        if hub_online():
            try:
                source, records = f"hub:{HUB[dataset][0]}/{HUB[dataset][1]}", read_hub(dataset)
                label = f"{dataset} (hub {HUB[dataset][0]})"
            except Exception as error:  # network, auth, a moved file: all mean "not available here"
                reason = f"the hub failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        else:
            reason = "no --data-path was given and the hub is offline (HF_HUB_OFFLINE=1)"
        if reason:
            message = (f"calibration set {dataset!r} is not available: {reason}. Download {HUB[dataset][1]} from "
                       f"https://huggingface.co/datasets/{HUB[dataset][0]} and pass --data-path, or use --dataset builtin")
            if not fallback:
                raise CalibrationDataError(message)
            print(f"[calibration] {message}. Falling back to builtin (nothing downloaded).")
            source, records = builtin_records()
            label = f"{BUILTIN_LABEL} (standing in for unavailable {dataset})"
            dataset, is_fallback = "builtin", True
    texts = [render(dataset, r, tokenizer, chat) for r in records]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationDataError(f"{source} yielded no non-empty text for {dataset}")
    return CalibrationTexts(dataset=dataset, label=label, source=source, texts=texts, fallback=is_fallback)


def sample_token_blocks(texts: list[str], tokenizer, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """N x L token ids, deterministic in ``seed``: texts in seeded order, tokenized, joined by <|endoftext|>,
    cut into consecutive rows; raises when the texts hold fewer than N * L tokens."""
    if n_samples < 1 or seq_len < 2:
        raise BadInputError(f"samples={n_samples}, seq_len={seq_len}: need at least 1 sample of 2 tokens")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    need, ids = n_samples * seq_len, []
    for i in order:
        ids.extend(tokenizer.encode(texts[i], add_special_tokens=False))
        ids.append(eos)
        if len(ids) >= need:
            return torch.tensor(ids[:need], dtype=torch.long).view(n_samples, seq_len)
    raise CalibrationDataError(f"the calibration texts hold {len(ids)} tokens, fewer than {n_samples} x {seq_len}; "
                               "lower --samples/--seq-len or give a larger set")
