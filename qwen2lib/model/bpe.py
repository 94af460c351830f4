"""Qwen's byte-level BPE, the pieces every way of getting its tokenizer shares: the pre-tokenizer pattern and a
``tokenizers.Tokenizer`` built from a vocabulary, merges and added tokens (the family tokenizer from the shipped
ranks, a GGUF's ``tokenizer.ggml.*`` metadata)."""
from __future__ import annotations

from typing import Iterable, Mapping

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# Qwen's pre-tokenizer: like GPT-4's, except digits split one by one (\p{N}, not \p{N}{1,3}).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen_byte_level_bpe(vocab: Mapping[str, int], merges: Iterable[tuple[str, str]],
                        added: Iterable[tuple[int, str, bool]] = ()) -> Tokenizer:
    """A Qwen2 tokenizer from its parts: ``vocab`` {token: id} of the BPE, ``merges`` in rank order, and the added
    tokens (id, text, special) that must land on their ids. Raises ValueError when an added token would not."""
    tokenizer = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), ignore_merges=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    for i, token, special in added:
        tokenizer.add_tokens([AddedToken(token, special=special, normalized=False)])
        if tokenizer.token_to_id(token) != i:
            raise ValueError(f"added token {token!r} would take id {tokenizer.token_to_id(token)}, not {i}")
    return tokenizer
