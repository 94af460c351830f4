"""Benchmark files in their published layouts: which set a path holds, and its rows.

A path may be OpenCompassData-core (its top folder, its ``data/`` folder or the release zip:
``data/ceval/formal_ceval/{dev,val,test}/{subject}_{split}.csv``, ``data/cmmlu/{dev,test}/{subject}.csv``,
``data/mmlu/{dev,test}/{subject}_{split}.csv``) or one set's own release: ``ceval-exam.zip`` or its folder
(``{dev,val,test}/{subject}_{split}.csv``, header ``id,question,A,B,C,D,answer``), CMMLU's
``data/{dev,test}/{subject}.csv`` (header ``,Question,A,B,C,D,Answer``), MMLU's Hendrycks ``data.tar`` or
its folder (``{dev,val,test}/{subject}_{split}.csv``, no header). Folders, zips and tars are read in
place. Which set a group of CSVs is comes from its header, so pointing ``mmlu`` at C-Eval says so.
"""
from __future__ import annotations

import csv
import io
import json
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Qwen2LibError
from .subjects import prompt_name

DATASETS = ("ceval", "cmmlu", "mmlu")
TITLES = {"ceval": "C-Eval", "cmmlu": "CMMLU", "mmlu": "MMLU"}
SCORED_SPLIT = {"ceval": "val", "cmmlu": "test", "mmlu": "test"}  # what OpenCompass scores; dev gives the shots
SHOT_SPLIT = "dev"
OPENCOMPASS_ROOT = {"ceval": "ceval/formal_ceval/", "cmmlu": "cmmlu/", "mmlu": "mmlu/"}
PUBLISHED_FORM = {"ceval": "ceval-exam layout", "cmmlu": "CMMLU layout", "mmlu": "MMLU (Hendrycks) layout"}
EXPECTED = {
    "ceval": "C-Eval: OpenCompassData-core (folder, data/ or zip; data/ceval/formal_ceval/{dev,val}/{subject}_{split}.csv) "
             "or ceval-exam.zip / its folder ({dev,val}/{subject}_{split}.csv, header id,question,A,B,C,D,answer)",
    "cmmlu": "CMMLU: OpenCompassData-core (folder, data/ or zip; data/cmmlu/{dev,test}/{subject}.csv) or CMMLU's "
             "data/{dev,test}/{subject}.csv (header ,Question,A,B,C,D,Answer; folder or zip)",
    "mmlu": "MMLU: OpenCompassData-core (folder, data/ or zip; data/mmlu/{dev,test}/{subject}_{split}.csv) or "
            "Hendrycks' data.tar / data/{dev,test}/{subject}_{split}.csv (no header: question,A,B,C,D,answer)",
}
NOT_CEVAL_MARKER = "NOT_CEVAL.txt"
CHOICES = ("A", "B", "C", "D")

_IN_SPLIT = re.compile(r"^(?P<root>(?:.+/)?)(?P<split>dev|val|test)/(?P<stem>[^/]+)\.csv$")
_FLAT = re.compile(r"^(?P<root>(?:.+/)?)(?P<subject>[^/]+)_(?P<split>dev|val|test)\.csv$")


class EvalDataError(Qwen2LibError, FileNotFoundError):
    """Benchmark files missing, in an unknown layout, or of another benchmark than the one asked for."""


class Files:
    """The files of a folder, a zip, a tar or one CSV, by posix path relative to it; read in place."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._list(path)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:  # a damaged archive is the user's file
            raise EvalDataError(f"{path} cannot be read ({type(exc).__name__}: {exc}): download it again") from exc

    def _list(self, path: Path) -> None:
        if path.is_dir():
            self.kind = "folder"
            self.names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                                if p.suffix in (".csv", ".json", ".txt") and p.is_file())
        elif zipfile.is_zipfile(path):
            self.kind = "zip"
            with zipfile.ZipFile(path) as archive:
                self.names = sorted(n for n in archive.namelist() if not n.endswith("/") and "__MACOSX/" not in n)
        elif tarfile.is_tarfile(path):
            self.kind = "tar"
            with tarfile.open(path) as archive:
                self.names = sorted(m.name.removeprefix("./") for m in archive.getmembers() if m.isfile())
        elif path.suffix == ".csv":
            self.kind, self.names = "csv", [path.name]
        else:
            raise EvalDataError(f"{path} is not a folder, a zip or tar archive, or a CSV file")

    def read_text(self, name: str) -> str:
        try:
            return self._read(name).decode("utf-8-sig")  # CMMLU's CSVs may start with a byte-order mark
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, UnicodeDecodeError) as exc:
            raise EvalDataError(f"{self.path}: {name} cannot be read ({type(exc).__name__}: {exc}): the file is "
                                "damaged or not UTF-8 text; download it again") from exc

    def _read(self, name: str) -> bytes:
        if self.kind == "folder":
            data = (self.path / name).read_bytes()
        elif self.kind == "csv":
            data = self.path.read_bytes()
        elif self.kind == "zip":
            with zipfile.ZipFile(self.path) as archive:
                data = archive.read(name)
        else:
            with tarfile.open(self.path) as archive:
                member = archive.getmember(name) if name in archive.getnames() else archive.getmember("./" + name)
                data = archive.extractfile(member).read()
        return data


@dataclass
class Group:
    """CSV files that share a root folder and a naming scheme: one benchmark copy."""

    root: str
    files: dict = field(default_factory=dict)  # (subject, split) -> name
    kind: str | None = None  # ceval | cmmlu | mmlu by header; None: unrecognised

    def splits(self) -> set[str]:
        return {split for _, split in self.files}


def _sniff(text: str) -> str | None:
    header = [c.strip() for c in next(csv.reader(io.StringIO(text)), [])]
    if "question" in header:
        return "ceval"
    if "Question" in header and "Answer" in header:
        return "cmmlu"
    if len(header) == 6 and header[5] in CHOICES:  # Hendrycks' files have no header: the first row is a question
        return "mmlu"
    return None


def find_groups(files: Files) -> list[Group]:
    groups: dict[tuple[str, str], Group] = {}
    for name in files.names:
        if m := _IN_SPLIT.match(name):
            split, stem = m["split"], m["stem"]
            suffixed = stem.endswith("_" + split)
            key, subject = (m["root"], "suffixed" if suffixed else "bare"), stem[:-len(split) - 1] if suffixed else stem
        elif m := _FLAT.match(name):
            key, subject, split = (m["root"], "flat"), m["subject"], m["split"]
        else:
            continue
        groups.setdefault(key, Group(root=key[0])).files[(subject, split)] = name
    for group in groups.values():
        sample = sorted(group.files.items(), key=lambda kv: (kv[0][1] != SHOT_SPLIT, kv[0]))[0][1]
        group.kind = _sniff(files.read_text(sample))
    return list(groups.values())


def _describe(files: Files, groups: list[Group]) -> str:
    known = [g for g in groups if g.kind]
    if known:
        return "; ".join(f"{TITLES[g.kind]} CSVs ({'/'.join(sorted(g.splits()))}) under '{g.root or './'}'" for g in known)
    if groups:
        return f"CSVs in split folders whose header is none of the three ({groups[0].root or './'})"
    shown = ", ".join(files.names[:3]) + (", ..." if len(files.names) > 3 else "")
    return f"{len(files.names)} files, no {{dev,val,test}} CSVs" + (f" ({shown})" if shown else "")


@dataclass
class Benchmark:
    """One benchmark copy: its files and how its rows read."""

    dataset: str
    path: Path
    files: Files
    group: Group
    form: str
    label: str
    names: dict[str, str]  # subject -> the name its prompt uses

    @property
    def split(self) -> str:
        return SCORED_SPLIT[self.dataset]

    def subjects(self, split: str | None = None) -> list[str]:
        split = split or self.split
        return sorted(s for s, sp in self.group.files if sp == split)

    def has(self, subject: str, split: str) -> bool:
        return (subject, split) in self.group.files

    def rows(self, subject: str, split: str) -> list[dict]:
        name = self.group.files.get((subject, split))
        if name is None:
            raise EvalDataError(f"{self.path}: no {split} file for {subject} in the {self.form}")
        return parse_rows(self.dataset, self.files.read_text(name), f"{self.path}:{name}")

    def describe(self) -> str:
        return f"{self.label}, {self.form}, {self.path}" + (f" ({self.group.root})" if self.group.root else "")


def parse_rows(dataset: str, text: str, where: str) -> list[dict]:
    """Rows as {id, question, A, B, C, D, answer (None in C-Eval's test split)[, explanation]}."""
    if dataset == "mmlu":
        raw = [r for r in csv.reader(io.StringIO(text)) if r]
        bad = [i for i, r in enumerate(raw) if len(r) != 6]
        if bad:
            raise EvalDataError(f"{where}: row {bad[0]} has {len(raw[bad[0]])} fields; MMLU rows are question,A,B,C,D,answer")
        rows = [{"id": i, **dict(zip(("question", *CHOICES, "answer"), r))} for i, r in enumerate(raw)]
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
        if dataset == "cmmlu":
            rows = [{**r, "id": r.get("", i), "question": r.get("Question"), "answer": r.get("Answer")}
                    for i, r in enumerate(rows)]
        missing = [c for c in ("question", *CHOICES) if rows and rows[0].get(c) is None]
        if missing:
            raise EvalDataError(f"{where}: missing column(s) {', '.join(missing)} for {TITLES[dataset]}")
    for i, row in enumerate(rows):
        answer = (row.get("answer") or "").strip() or None
        if answer is not None and answer not in CHOICES:
            raise EvalDataError(f"{where}: row {i} answer {answer!r} is not one of A/B/C/D")
        row["answer"] = answer
    return rows


def _pick(dataset: str, groups: list[Group], need_split: str | None) -> Group | None:
    fits = [g for g in groups if g.kind == dataset and (need_split is None or need_split in g.splits())]
    if not fits:
        return None
    return min(fits, key=lambda g: (not g.root.endswith(OPENCOMPASS_ROOT[dataset]), -len(g.files), len(g.root)))


def open_benchmark(dataset: str, path, need_split: str | None = "scored") -> Benchmark:
    """The ``dataset`` copy in ``path`` (folder, zip, tar or CSV), or a one-line error naming what was expected and
    what was found. ``need_split``: "scored" (the split the benchmark scores), a split name, or None (any)."""
    if dataset not in DATASETS:
        raise EvalDataError(f"dataset={dataset!r}: one of {', '.join(DATASETS)}")
    path = Path(path).expanduser()
    if not path.exists():
        raise EvalDataError(f"{path} does not exist; expected {EXPECTED[dataset]}")
    need = SCORED_SPLIT[dataset] if need_split == "scored" else need_split
    files = Files(path)
    groups = find_groups(files)
    group = _pick(dataset, groups, need)
    if group is None:
        lacking = f" with a {need} split" if need and any(g.kind == dataset for g in groups) else ""
        raise EvalDataError(f"{path}: expected {EXPECTED[dataset]}{lacking}; found {_describe(files, groups)}")
    opencompass = group.root.endswith(OPENCOMPASS_ROOT[dataset]) and (group.root.startswith("data/") or "/data/" in group.root
                                                                       or group.root == OPENCOMPASS_ROOT[dataset])
    form = ("OpenCompassData-core layout" if opencompass else PUBLISHED_FORM[dataset]) + f" ({files.kind})"
    marker = group.root + NOT_CEVAL_MARKER
    label = (files.read_text(marker).splitlines()[0] if marker in files.names
             else f"{TITLES[dataset]} ({SCORED_SPLIT[dataset]})")
    names = {s: prompt_name(dataset, s) for s, _ in group.files}
    mapping = group.root + "subject_mapping.json"
    if dataset == "ceval" and mapping in files.names:  # C-Eval's own table: subject -> [English, Chinese, category]
        names.update({k: v[1] for k, v in json.loads(files.read_text(mapping)).items()})
    return Benchmark(dataset, path, files, group, form, label, names)
