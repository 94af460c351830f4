"""The real Qwen2 tokenizer, built offline from the BPE ranks that ship in the ``dashscope`` package.

Qwen2 and Qwen2.5 share one byte-level BPE (151,643 ranks, the same as Qwen-1 ``qwen.tiktoken``)
and differ only in their control tokens and chat template. When a checkpoint folder carries its
own tokenizer files those win; otherwise the family's tokenizer is built once and cached on disk.
"""
from __future__ import annotations

import base64
import importlib.resources
import json
import os
from pathlib import Path

import tiktoken
from tokenizers import AddedToken, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from ..artifacts import atomic_dir
from ..paths import cache_root
from .bpe import QWEN_PATTERN
from .registry import resolve

FIRST_CONTROL_ID = 151643
NUM_RANKS = 151643

# (token, special): "special" tokens are dropped by decode(skip_special_tokens=True); Qwen2.5 keeps
# its tool-call and fill-in-the-middle markers as plain added tokens so code completions decode them.
CONTROL_TOKENS = {
    "qwen2": [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True)],
    "qwen2.5": [
        ("<|endoftext|>", True),
        ("<|im_start|>", True),
        ("<|im_end|>", True),
        ("<|object_ref_start|>", True),
        ("<|object_ref_end|>", True),
        ("<|box_start|>", True),
        ("<|box_end|>", True),
        ("<|quad_start|>", True),
        ("<|quad_end|>", True),
        ("<|vision_start|>", True),
        ("<|vision_end|>", True),
        ("<|vision_pad|>", True),
        ("<|image_pad|>", True),
        ("<|video_pad|>", True),
        ("<tool_call>", False),
        ("</tool_call>", False),
        ("<|fim_prefix|>", False),
        ("<|fim_middle|>", False),
        ("<|fim_suffix|>", False),
        ("<|fim_pad|>", False),
        ("<|repo_name|>", False),
        ("<|file_sep|>", False),
    ],
}

DEFAULT_SYSTEM_PROMPT = {
    "qwen2": "You are a helpful assistant.",
    "qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
}

# The files that make a checkpoint's tokenizer (either layout: tokenizer.json, or vocab.json + merges.txt) and its
# generation settings: copied into every package and part of the checkpoint's identity.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")


def chat_template(family: str) -> str:
    """ChatML: each turn is <|im_start|>{role}\\n{content}<|im_end|>\\n; a system turn is added when absent."""
    system = DEFAULT_SYSTEM_PROMPT[family]
    return (
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def ranks_path() -> Path:
    """The BPE ranks file inside the installed ``dashscope`` package."""
    try:
        path = Path(str(importlib.resources.files("dashscope") / "resources" / "qwen.tiktoken"))
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            "the Qwen BPE ranks come from the 'dashscope' package, which is not installed: "
            "run `python3 tasks.py test` once (it builds .venv), or pip install -r requirements.txt"
        ) from exc
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall dashscope (pip install --force-reinstall dashscope)")
    return path


def load_ranks() -> dict[bytes, int]:
    """151,643 byte strings -> merge rank, read from ``qwen.tiktoken`` (base64 token, space, rank)."""
    ranks = {}
    for line in ranks_path().read_text(encoding="utf-8").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != NUM_RANKS:
        raise RuntimeError(f"{ranks_path()} holds {len(ranks)} ranks, expected {NUM_RANKS}: reinstall dashscope")
    return ranks


def tiktoken_encoding(family: str = "qwen2"):
    """The same tokenizer as a ``tiktoken.Encoding``: the independent reference the tests compare against."""
    specials = {tok: FIRST_CONTROL_ID + i for i, (tok, _) in enumerate(CONTROL_TOKENS[family])}
    return tiktoken.Encoding(f"{family}-tiktoken", pat_str=QWEN_PATTERN, mergeable_ranks=load_ranks(), special_tokens=specials)


def build_tokenizer(family: str, instruct: bool):
    """Construct the fast tokenizer from the ranks (tens of seconds; ``load_tokenizer`` caches it)."""
    if family not in CONTROL_TOKENS:
        raise ValueError(f"unknown tokenizer family {family!r}; known: {', '.join(CONTROL_TOKENS)}")
    backend = TikTokenConverter(vocab_file=str(ranks_path()), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens([AddedToken(tok, special=special, normalized=False) for tok, special in CONTROL_TOKENS[family]])
    for i, (tok, _) in enumerate(CONTROL_TOKENS[family]):
        assert backend.token_to_id(tok) == FIRST_CONTROL_ID + i, f"{tok} landed on {backend.token_to_id(tok)}"
    extra = [tok for tok, special in CONTROL_TOKENS[family] if special and tok != "<|endoftext|>"]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>" if instruct else "<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=extra,
        chat_template=chat_template(family),
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def cached_family_tokenizer_dir(family: str, instruct: bool) -> Path:
    """Build the family's tokenizer once into the cache and return its folder."""
    folder = cache_root() / "tokenizers" / f"{family}{'-instruct' if instruct else ''}"
    if not (folder / "tokenizer.json").is_file():
        tokenizer = build_tokenizer(family, instruct)
        with atomic_dir(folder) as tmp:
            tokenizer.save_pretrained(tmp)
            (tmp / "qwen2lib.json").write_text(
                json.dumps({"family": family, "instruct": instruct, "source": str(ranks_path())}, indent=2)
            )
    return folder


def load_tokenizer(model: str = "tiny"):
    """``transformers.PreTrainedTokenizerFast`` for a registry name, hub id or checkpoint folder.

    A folder with tokenizer files loads those; anything else gets the family tokenizer built from
    the shipped ranks (Qwen1.5 and Qwen2 use the Qwen2 family, Qwen2.5 its own).
    """
    folder = Path(str(model)).expanduser()
    if folder.is_dir() and has_tokenizer_files(folder):
        return AutoTokenizer.from_pretrained(folder)
    spec = resolve(model)
    if spec.folder is not None and has_tokenizer_files(spec.folder):
        return AutoTokenizer.from_pretrained(spec.folder)
    return AutoTokenizer.from_pretrained(cached_family_tokenizer_dir(spec.tokenizer_family, spec.instruct))
