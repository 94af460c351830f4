"""The deploy package's explicit KV cache (patch 4, explicit_kv_cache), copied into it as ``kv_cache_<target>.py``.

A ``DynamicCache`` is a Python object the model mutates, which an exported graph cannot take as an input. The
package's forward also takes ``past_key_values=[(k, v), ...]``, per layer one key and one value tensor of shape
(batch, kv_heads, past, head_dim) (``[]`` on the first call), and returns ``presents``, the same list including the
new tokens. Imports only torch and transformers: the package runs where qwen2lib is not installed.
"""
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast


@dataclass
class Qwen2ModelOutputWithPresents(BaseModelOutputWithPast):
    r"""
    presents (`list[tuple[torch.Tensor, torch.Tensor]]`, *optional*):
        Returned when `past_key_values` is given: per layer, the (key, value) of every position so far, each of
        shape (batch, num_key_value_heads, past + new tokens, head_dim). Feed them back as `past_key_values`.
    """

    presents: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class Qwen2CausalLMOutputWithPresents(CausalLMOutputWithPast):
    r"""
    presents (`list[tuple[torch.Tensor, torch.Tensor]]`, *optional*):
        See `Qwen2ModelOutputWithPresents`.
    """

    presents: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def cache_convention(
    cache: Cache | None, past_key_values: list | Cache | None, num_layers: int
) -> tuple[Cache | None, list | None]:
    """(cache, past_key_values) with at most one of them set: which KV convention this forward uses."""
    if isinstance(past_key_values, Cache):
        # Before transformers 5 the Cache object was called past_key_values: keep those callers working
        cache, past_key_values = past_key_values, None
    if cache is not None and past_key_values is not None:
        raise ValueError(
            "pass either cache= (a transformers Cache) or past_key_values= (a list of (key, value) tensors "
            "per layer; [] for the first call), not both"
        )
    if past_key_values and len(past_key_values) != num_layers:
        raise ValueError(
            f"past_key_values has {len(past_key_values)} (key, value) pairs; the model has {num_layers} layers"
        )
    return cache, past_key_values


def past_length(past_key_values: list | None, cache: Cache | None) -> int:
    """How many positions are cached already, in whichever convention is in use."""
    if past_key_values is not None:
        return past_key_values[0][0].shape[-2] if past_key_values else 0
    return cache.get_seq_length() if cache is not None else 0


def append_past(
    past_key_value: tuple[torch.Tensor, torch.Tensor], key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's cached (key, value), each (B, KVH, past, hd), with the new (B, KVH, T, hd) appended: the present."""
    return torch.cat([past_key_value[0], key], dim=-2), torch.cat([past_key_value[1], value], dim=-2)
