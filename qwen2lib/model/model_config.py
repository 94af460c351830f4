"""The one model-config type: ``Qwen2Args``, a Qwen2 architecture as config.json states it, with what follows from
it (head_dim, KV groups, each layer's attention window). The torch model (``model.py``), the graph builder, the
memory estimates and the random-checkpoint writer all read a config through it; ``Qwen2Args.preset(name)`` gives a
registry model's (the published configs are the table in ``family.py``). It holds no model code: estimating what a
stage needs builds nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..errors import BadInputError
from .registry import resolve


@dataclass
class Qwen2Args:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None  # {"rope_type"|"type": linear|dynamic|yarn, "factor": ..., ...}
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 0
    dual_chunk_attention_config: dict | None = None  # {"chunk_size", "local_size", "original_max_position_embeddings"}

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise BadInputError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def kv_groups(self) -> int:
        """Query heads that share one KV head (1 = multi-head attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def layer_window(self, layer: int) -> int | None:
        """Qwen2 applies the sliding window to layers at or above ``max_window_layers``."""
        if self.use_sliding_window and self.sliding_window and layer >= self.max_window_layers:
            return self.sliding_window
        return None

    @classmethod
    def from_config_dict(cls, cfg: dict) -> "Qwen2Args":
        """From a config.json dict (old ``rope_theta``/``rope_scaling`` or v5 ``rope_parameters`` form)."""
        rope_params = dict(cfg.get("rope_parameters") or {})
        theta = cfg.get("rope_theta", rope_params.pop("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
        names = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in cfg.items() if k in names and k not in ("rope_theta", "rope_scaling")}
        if kwargs.get("num_key_value_heads") is None and "num_attention_heads" in kwargs:  # transformers' default: MHA
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        return cls(**kwargs, rope_theta=theta, rope_scaling=scaling)

    @classmethod
    def from_hf(cls, config) -> "Qwen2Args":
        """From a ``transformers.Qwen2Config``."""
        return cls.from_config_dict(config.to_dict())

    @classmethod
    def preset(cls, name: str) -> "Qwen2Args":
        """The architecture of a registry model (``Qwen2.5-7B``, ``tiny``, ...)."""
        return cls.from_config_dict(resolve(name).config)


def as_args(config: "Qwen2Args | Mapping") -> Qwen2Args:
    """``config`` as a ``Qwen2Args``: a config.json dict is read with ``from_config_dict``."""
    return config if isinstance(config, Qwen2Args) else Qwen2Args.from_config_dict(dict(config))


def shape_numbers(config: Qwen2Args | Mapping) -> dict[str, int]:
    """H, I, V, L, query heads, KV heads and head_dim of a config (a ``Qwen2Args`` or config.json dict)."""
    a = as_args(config)
    return {"H": a.hidden_size, "I": a.intermediate_size, "V": a.vocab_size, "L": a.num_hidden_layers,
            "n_h": a.num_attention_heads, "n_kv": a.num_key_value_heads, "hd": a.head_dim}
