"""Corpora every machine that runs the workbook already has: the Python standard library's own sources (code),
and the README texts of the Python packages installed beside it (English technical prose, ``prose_corpus``).

Nothing is downloaded and nothing is copied into this repository. The selection rule is fixed and
written into the description: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` except the
folders and files in ``EXCLUDED_DIRS`` / ``EXCLUDED_FILES`` (test suites, GUI code, vendored or
generated text, and the parts Linux distributions split into separate packages), in sorted order.

Whether a file is held out depends on its own path and the seed only (a hash, not a position in the
list), so one file is on the same side on every install, even one that lacks some packages. A SHA-256
over (relative path, content) of the used files records exactly which text a model saw.
"""
from __future__ import annotations

import email
import hashlib
import random
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Left out, by folder name anywhere in the path: test suites (huge, repetitive fixtures), GUI code and
# demos, vendored or generated text (pydoc's topic dump, the codec tables of encodings/ that would make
# perplexity meaninglessly low), and what Debian/Ubuntu ship as separate packages (lib2to3, distutils,
# tkinter, idlelib, ensurepip), so a distribution's python3.11 selects the same files as python.org's.
EXCLUDED_DIRS = frozenset({
    "__pycache__", "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "tkinter",
    "turtledemo", "lib2to3", "distutils", "ensurepip", "pydoc_data", "encodings", "__phello__",
})
# Top-level files that differ per machine (build configuration, site hooks) or are one data table.
EXCLUDED_FILES = ("_sysconfigdata", "sitecustomize.py", "usercustomize.py", "this.py", "html/entities.py")
SELECTION_RULE = (
    "every *.py under the stdlib folder, sorted by relative path, except folders named "
    + ", ".join(sorted(EXCLUDED_DIRS)) + ", folders config-*, and files starting with " + ", ".join(EXCLUDED_FILES)
)


# A package's README (its METADATA long description) of at least this many characters is a document of the prose
# corpus; shorter ones are a line or two of boilerplate.
MIN_PROSE_CHARS = 2000
PROSE_RULE = (f"the long description (README) of every *.dist-info/METADATA under the interpreter's purelib folder "
              f"of at least {MIN_PROSE_CHARS} characters (qwen2lib's own excepted), sorted by folder name")


@dataclass(frozen=True)
class Corpus:
    root: Path
    train_files: tuple[str, ...]  # posix paths relative to root, sorted
    heldout_files: tuple[str, ...]  # never trained on
    sha256: str = field(repr=False)  # over (relative path, content) of train + held-out files
    seed: int = 0
    held_out_fraction: float = 0.05
    kind: str = "code"  # "code": source files read whole; "prose": package METADATA files, their description read

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(sorted(self.train_files + self.heldout_files))

    @property
    def description(self) -> str:
        version = ".".join(map(str, sys.version_info[:3]))
        what = (f"README texts of the installed Python packages under {self.root}: {PROSE_RULE}" if self.kind == "prose"
                else f"CPython {version} standard library sources under {self.root}: {SELECTION_RULE}")
        return (
            f"{what}. "
            f"{len(self.train_files)} train files, {len(self.heldout_files)} held-out files "
            f"(a file is held out when sha256('{self.seed}:' + path) falls in the lowest "
            f"{self.held_out_fraction:.0%} of the hash range)"
        )

    def read(self, relative: str) -> str:
        text = (self.root / relative).read_text(encoding="utf-8", errors="replace")
        return readme_of(text) if self.kind == "prose" else text

    def summary(self) -> dict:
        return {
            "description": self.description,
            "selection_rule": PROSE_RULE if self.kind == "prose" else SELECTION_RULE,
            "kind": self.kind,
            "root": str(self.root),
            "python": ".".join(map(str, sys.version_info[:3])),
            "sha256": self.sha256,
            "train_files": len(self.train_files),
            "heldout_files": len(self.heldout_files),
            "heldout_file_names": list(self.heldout_files),
            "seed": self.seed,
            "held_out_fraction": self.held_out_fraction,
        }


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_selected(relative: str) -> bool:
    """The selection rule for one posix path relative to the stdlib folder."""
    parts = relative.split("/")
    if EXCLUDED_DIRS.intersection(parts[:-1]) or any(p.startswith("config-") for p in parts[:-1]):
        return False
    return relative.endswith(".py") and not relative.startswith(EXCLUDED_FILES)


def is_held_out(relative: str, seed: int, fraction: float) -> bool:
    """A per-file coin: depends on nothing but the path and the seed, so it is stable across installs."""
    digest = hashlib.sha256(f"{seed}:{relative}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def corpus_sha256(root: Path, files) -> str:
    digest = hashlib.sha256()
    for relative in sorted(files):
        content = (root / relative).read_bytes()
        # lengths first, so no two different (path, content) lists can hash the same
        digest.update(f"{len(relative)}:{relative}:{len(content)}:".encode())
        digest.update(content)
    return digest.hexdigest()


def stdlib_corpus(seed: int = 0, held_out_fraction: float = 0.05) -> Corpus:
    """The stdlib split into train and held-out files; the same on every install of one CPython version."""
    root = stdlib_root()
    files = sorted(rel for rel in (p.relative_to(root).as_posix() for p in root.rglob("*.py")) if is_selected(rel))
    if len(files) < 100:
        raise RuntimeError(f"only {len(files)} Python files under {root}: is this a full CPython installation?")
    heldout = tuple(f for f in files if is_held_out(f, seed, held_out_fraction))
    train = tuple(f for f in files if not is_held_out(f, seed, held_out_fraction))
    if not heldout:
        raise ValueError(f"held_out_fraction={held_out_fraction} holds out none of {len(files)} files")
    return Corpus(root=root, train_files=train, heldout_files=heldout, sha256=corpus_sha256(root, files),
                  seed=seed, held_out_fraction=held_out_fraction)


def readme_of(metadata: str) -> str:
    """The long description of a METADATA file: its body, or the Description header of older metadata versions."""
    message = email.message_from_string(metadata)
    body = message.get_payload()
    return body if isinstance(body, str) and body.strip() else str(message.get("Description") or "")


def prose_root() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def prose_corpus(seed: int = 0, held_out_fraction: float = 0.2) -> Corpus:
    """The installed packages' READMEs split into train and held-out packages (by a hash of the folder name without
    its version, so a package stays on its side across versions). English prose with some code and reST/Markdown:
    the offline stand-in for general text (c4) when no data set is given."""
    root = prose_root()
    found = sorted(p.relative_to(root).as_posix() for p in root.glob("*.dist-info/METADATA"))
    files = [f for f in found if not f.startswith("qwen2lib-")  # our own README changes with every edit
             and len(readme_of((root / f).read_text(encoding="utf-8", errors="replace"))) >= MIN_PROSE_CHARS]
    if len(files) < 10:
        raise RuntimeError(f"only {len(files)} package READMEs under {root}: the prose corpus needs the workbook's "
                           "installed packages (run from its .venv)")
    package = lambda f: f.split("-")[0].lower()  # noqa: E731  (name of "name-1.2.dist-info/METADATA")
    heldout = tuple(f for f in files if is_held_out(package(f), seed, held_out_fraction))
    train = tuple(f for f in files if not is_held_out(package(f), seed, held_out_fraction))
    return Corpus(root=root, train_files=train, heldout_files=heldout, sha256=corpus_sha256(root, files),
                  seed=seed, held_out_fraction=held_out_fraction, kind="prose")


CORPORA = {"code": stdlib_corpus, "prose": prose_corpus}


def model_text(embedded: bool) -> str:
    """The text a model's stages calibrate and verify on by default: the embedded models learned the stdlib's code;
    any other checkpoint is a general model, so general text (code would calibrate it for one narrow domain)."""
    return "code" if embedded else "prose"


# ---- tokenization ----------------------------------------------------------------------------------

def tokenize_files(corpus: Corpus, files, tokenizer) -> list[torch.Tensor]:
    """Each file's token ids, in the order given. One batched call: the Rust tokenizer uses every core."""
    texts = [corpus.read(relative) for relative in files]
    return [torch.tensor(ids, dtype=torch.long) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def shuffled_files(files, seed: int) -> list[str]:
    order = list(files)
    random.Random(seed).shuffle(order)
    return order


def token_stream(corpus: Corpus, files, tokenizer, max_tokens: int | None = None, seed: int = 0) -> torch.Tensor:
    """Files in seeded order, tokenized and joined by <|endoftext|>, stopping once ``max_tokens`` are in. (N,)

    Files are tokenized in groups and only until the budget is reached, so a short run reads a few files.
    """
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    order = shuffled_files(files, seed)
    pieces: list[torch.Tensor] = []
    count, group = 0, 16
    for start in range(0, len(order), group):
        for ids in tokenize_files(corpus, order[start : start + group], tokenizer):
            pieces += [ids, torch.tensor([eos])]
            count += ids.numel() + 1
        if max_tokens is not None and count >= max_tokens:
            break
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    return stream if max_tokens is None else stream[:max_tokens]


def blocks(stream: torch.Tensor, block_len: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping rows of ``block_len``; the tail is dropped. (N // block_len, block_len)"""
    n = stream.numel() // block_len
    return stream[: n * block_len].view(n, block_len)


def spread_blocks(per_file_ids: list[torch.Tensor], n_blocks: int, block_len: int) -> torch.Tensor:
    """``n_blocks`` rows taken round-robin over files, each file's blocks evenly spaced through it.

    Round-robin keeps one long file from dominating; even spacing covers a file's code, not just its
    module docstring. Returns (n_blocks, block_len); raises if the files hold fewer blocks.
    """
    per_file = [blocks(ids, block_len) for ids in per_file_ids]
    available = sum(b.shape[0] for b in per_file)
    if available < n_blocks:
        raise ValueError(f"{len(per_file)} files hold only {available} blocks of {block_len} tokens (asked for {n_blocks})")
    # how many blocks each file gives: one per file per round until n_blocks are taken
    take = [0] * len(per_file)
    remaining = n_blocks
    while remaining:
        for i, b in enumerate(per_file):
            if remaining and take[i] < b.shape[0]:
                take[i] += 1
                remaining -= 1
    rows = []
    for b, k in zip(per_file, take):
        if k:
            rows.append(b[torch.linspace(0, b.shape[0] - 1, k).round().long()])
    return torch.cat(rows)


def heldout_token_blocks(tokenizer, n_blocks: int, block_len: int, seed: int = 0, text: str = "code") -> torch.Tensor:
    """Held-out text (never trained on) as (n_blocks, block_len) token ids, spread over the held-out files of the
    ``text`` corpus ("code": the stdlib's, "prose": the package READMEs').

    ``seed`` 0 takes the held-out files in sorted order; other seeds shuffle them first, which changes the
    files that give one block more than the others when ``n_blocks`` is not a multiple of their count.
    """
    if text not in CORPORA:
        raise ValueError(f"text={text!r}: held-out text is one of {', '.join(CORPORA)}")
    corpus = CORPORA[text](seed=0)
    files = list(corpus.heldout_files) if not seed else shuffled_files(corpus.heldout_files, seed)
    return spread_blocks(tokenize_files(corpus, files, tokenizer), n_blocks, block_len)
