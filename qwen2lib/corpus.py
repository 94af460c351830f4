"""A corpus every machine that runs the workbook already has: the Python standard library's own sources.

Nothing is downloaded and nothing is copied into this repository. The file list is sorted, the
held-out files are drawn with a seeded permutation, and a SHA-256 over (relative path, content)
records exactly which text a model saw.
"""
from __future__ import annotations

import hashlib
import random
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Folders left out: test suites (huge, repetitive fixtures), GUI demos, vendored or generated text, and
# the codec tables of encodings/ (character maps that would make held-out perplexity meaninglessly low).
EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip", "__pycache__", "pydoc_data",
     "tkinter", "encodings"}
)


@dataclass(frozen=True)
class Corpus:
    root: Path
    train_files: tuple[str, ...]  # posix paths relative to root, sorted
    heldout_files: tuple[str, ...]
    sha256: str = field(repr=False)
    seed: int = 0

    @property
    def description(self) -> str:
        version = ".".join(map(str, sys.version_info[:3]))
        return (
            f"CPython {version} standard library *.py sources under {self.root} "
            f"(excluding {', '.join(sorted(EXCLUDED_DIRS))}): {len(self.train_files)} train files, "
            f"{len(self.heldout_files)} held-out files (seeded permutation, seed {self.seed})"
        )

    def read(self, relative: str) -> str:
        return (self.root / relative).read_text(encoding="utf-8", errors="replace")

    def summary(self) -> dict:
        return {
            "description": self.description,
            "root": str(self.root),
            "sha256": self.sha256,
            "train_files": len(self.train_files),
            "heldout_files": len(self.heldout_files),
            "seed": self.seed,
        }


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(seed: int = 0, heldout_fraction: float = 0.05) -> Corpus:
    """The stdlib split into train and held-out files; the same on every install of one CPython version."""
    root = stdlib_root()
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts)
    )
    if len(files) < 20:
        raise RuntimeError(f"only {len(files)} Python files under {root}: is this a full CPython installation?")
    order = list(files)
    random.Random(seed).shuffle(order)
    n_heldout = max(1, round(len(files) * heldout_fraction))
    heldout = tuple(sorted(order[:n_heldout]))
    train = tuple(sorted(order[n_heldout:]))
    digest = hashlib.sha256()
    for relative in files:
        digest.update(relative.encode())
        digest.update(b"\0")
        digest.update((root / relative).read_bytes())
    return Corpus(root=root, train_files=train, heldout_files=heldout, sha256=digest.hexdigest(), seed=seed)


def token_stream(corpus: Corpus, files: tuple[str, ...], tokenizer, max_tokens: int, seed: int = 0) -> torch.Tensor:
    """Files in seeded order, tokenized and joined by <|endoftext|>, until ``max_tokens``. (N,) int64"""
    order = list(files)
    random.Random(seed).shuffle(order)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    for relative in order:
        ids.extend(tokenizer.encode(corpus.read(relative)))
        ids.append(eos)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def blocks(stream: torch.Tensor, block_len: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping rows of ``block_len``. (N // block_len, block_len)"""
    n = stream.numel() // block_len
    return stream[: n * block_len].view(n, block_len)


def spread_blocks(corpus: Corpus, files: tuple[str, ...], tokenizer, n_blocks: int, block_len: int,
                  per_file: int = 2) -> torch.Tensor:
    """Up to ``per_file`` blocks from the start of each file in sorted order, so one file cannot dominate.

    Returns (n_blocks, block_len) token ids; raises if the files hold fewer blocks.
    """
    rows: list[torch.Tensor] = []
    for relative in files:
        ids = torch.tensor(tokenizer.encode(corpus.read(relative)), dtype=torch.long)
        rows.extend(blocks(ids, block_len)[:per_file])
        if len(rows) >= n_blocks:
            return torch.stack(rows[:n_blocks])
    raise ValueError(f"{len(files)} files hold only {len(rows)} blocks of {block_len} tokens (asked for {n_blocks})")


def heldout_token_blocks(tokenizer, n_blocks: int, block_len: int, seed: int = 0) -> torch.Tensor:
    """Held-out text (never trained on) as (n_blocks, block_len) token ids, spread over the held-out files.

    ``seed`` picks the per-file spread: 0 takes blocks from each file's start; other seeds shuffle the files first.
    """
    corpus = stdlib_corpus(seed=0)
    files = list(corpus.heldout_files)
    if seed:
        random.Random(seed).shuffle(files)
    per_file = max(1, -(-n_blocks // len(files)))
    return spread_blocks(corpus, tuple(files), tokenizer, n_blocks, block_len, per_file=per_file)
