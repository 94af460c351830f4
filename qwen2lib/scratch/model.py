"""Qwen2 from scratch, the teaching implementation notebook 00 walks through.

One file, flat (its config dataclass, ``Qwen2Args``, is ``model_config.py``, shared with the stages that never load
a model): RMSNorm -> attention (q/k/v bias, grouped-query KV heads,
rotary positions) -> SwiGLU MLP -> decoder block -> causal LM with an explicit KV cache.
Parameter names follow the Hugging Face checkpoints, so a ``state_dict`` loads either way.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from . import dca, rope
from ..model.long_context import dca_config_from_dict
from .masks import positions_from_mask
from ..model.model_config import Qwen2Args



class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16/fp16 squares of large activations lose precision or overflow.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache:
    """Explicit per-layer key/value tensors, each (B, n_kv, T_past, hd), grown by concatenation.

    With Dual Chunk Attention the keys are stored *unrotated*, since their rotary position
    (p mod chunk length) is applied at attention time.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        """Tokens cached so far (read before a forward; during one, later layers lag layer 0)."""
        return self.layer_len(0)

    def layer_len(self, layer: int) -> int:
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


def attention_bias(
    q_positions: torch.Tensor, k_positions: torch.Tensor, key_padding: torch.Tensor | None, window: int | None, dtype
) -> torch.Tensor:
    """Additive mask (B or 1, 1, Tq, Tk): 0 where a query may see a key, -inf-ish elsewhere.

    A query sees keys at or before its position, within ``window`` if set, and not padding.
    """
    diff = q_positions[..., :, None] - k_positions[..., None, :]  # (B or 1, Tq, Tk)
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, :].bool()  # (B, 1, Tk)
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]


# Queries scored at once: (B, H, QUERY_BLOCK, Tk) fp32 scores, not (B, H, Tq, Tk) (12 heads x 8k x 8k = 3.2 GB).
QUERY_BLOCK = 1024


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + bias) v without materialising repeated KV heads.

    q: (B, H, Tq, hd); k, v: (B, n_kv, Tk, hd); H = n_kv * groups. Each KV head serves a
    contiguous group of query heads, the layout transformers' ``repeat_kv`` assumes.
    """
    B, H, Tq, hd = q.shape
    if Tq > QUERY_BLOCK:  # a long prompt: scores for QUERY_BLOCK queries at a time (each row's softmax is its own)
        return torch.cat([grouped_query_attention(q[:, :, i : i + QUERY_BLOCK], k, v,
                                                  None if bias is None else bias[:, :, i : i + QUERY_BLOCK])
                          for i in range(0, Tq, QUERY_BLOCK)], dim=2)
    n_kv, Tk = k.shape[1], k.shape[2]
    q = q.view(B, n_kv, H // n_kv, Tq, hd)  # (B, n_kv, groups, Tq, hd)
    scores = q @ k[:, :, None].transpose(-1, -2) / math.sqrt(hd)  # (B, n_kv, groups, Tq, Tk)
    if bias is not None:
        scores = scores + bias[:, :, None]  # bias (B, 1, Tq, Tk) -> (B, 1, 1, Tq, Tk)
    probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
    return (probs @ v[:, :, None]).view(B, H, Tq, hd)


class Attention(nn.Module):
    def __init__(self, args: Qwen2Args, layer: int):
        super().__init__()
        self.args, self.layer = args, layer
        hd, H, n_kv = args.head_dim, args.num_attention_heads, args.num_key_value_heads
        self.q_proj = nn.Linear(args.hidden_size, H * hd, bias=True)
        self.k_proj = nn.Linear(args.hidden_size, n_kv * hd, bias=True)
        self.v_proj = nn.Linear(args.hidden_size, n_kv * hd, bias=True)
        self.o_proj = nn.Linear(H * hd, args.hidden_size, bias=False)
        self.window = args.layer_window(layer)
        self.rope_scale = 1.0  # YaRN's cos/sin factor (Qwen2 sets it): DCA rotates q and k itself, so it scales here

    def forward(self, x, cos, sin, positions, key_padding, cache: KVCache | None, inv_freq):
        B, T, _ = x.shape
        hd = self.args.head_dim
        q = self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        if self.args.dual_chunk_attention_config:
            out = self._dual_chunk(q, k, v, cache, inv_freq, key_padding)
        else:
            q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
            if cache is not None:
                k, v = cache.update(self.layer, k, v)  # (B, n_kv, past + T, hd)
            k_positions = torch.arange(k.shape[2], device=x.device)
            if key_padding is not None:
                # Left-padded rows: positions count real tokens only, padding is masked out.
                k_positions = positions_from_mask(key_padding)
                k_positions = torch.where(key_padding.bool(), k_positions, -1)
            else:
                k_positions = k_positions[None]
            bias = None
            if T > 1 or key_padding is not None or self.window is not None:
                bias = attention_bias(positions, k_positions, key_padding, self.window, q.dtype)
            out = grouped_query_attention(q, k, v, bias)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _dual_chunk(self, q, k, v, cache, inv_freq, key_padding):
        if key_padding is not None:
            raise NotImplementedError("Dual Chunk Attention runs unpadded batches only; pass one prompt at a time")
        chunk_size, local_size, _ = dca_config_from_dict(self.args.dual_chunk_attention_config)
        past = cache.layer_len(self.layer) if cache is not None else 0
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # unrotated: DCA rotates keys by p mod chunk length itself
        # cos and sin both carry YaRN's factor in the plain path, so every score is scaled by its square
        scale = self.rope_scale**2 / math.sqrt(self.args.head_dim)
        if past == 0:
            return dca.dual_chunk_attention(q, k, v, inv_freq, chunk_size=chunk_size, local_size=local_size, scale=scale)
        return dca.dual_chunk_attention_decode(
            q, k, v, inv_freq, position_start=past, chunk_size=chunk_size, local_size=local_size, scale=scale
        )


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: Qwen2Args):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: Qwen2Args, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, positions, key_padding, cache, inv_freq):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, key_padding, cache, inv_freq)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, decoder blocks and final norm: ``model.*`` in a checkpoint."""

    def __init__(self, args: Qwen2Args):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Qwen2(nn.Module):
    """Causal LM: ``forward(input_ids, cache)`` returns logits (B, T, V) and appends to ``cache``."""

    def __init__(self, args: Qwen2Args):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.set_rope()

    def set_rope(self) -> None:
        """The rotary frequencies and attention scale of ``args``' rope scaling (default, linear, dynamic, YaRN)."""
        a = self.args
        inv_freq, scale = rope.inv_freq_from_scaling(a.head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scale = scale
        for block in self.model.layers:
            block.self_attn.rope_scale = scale

    @classmethod
    def sharing_weights(cls, base: "Qwen2", args: Qwen2Args) -> "Qwen2":
        """A model of ``args`` (other rope scaling, DCA) on ``base``'s weight tensors themselves: no copy."""
        with torch.device("meta"):  # the skeleton allocates nothing
            model = cls(args)
        model.load_state_dict(base.state_dict(), assign=True)
        model.set_rope()  # computed on the meta device above
        return model.eval()

    def new_cache(self) -> KVCache:
        return KVCache(self.args.num_hidden_layers)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """inv_freq for this step (dynamic NTK grows it with the length) and the cos/sin tables."""
        inv_freq = self.inv_freq
        scaling = self.args.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type")) == "dynamic":
            seq_len = int(positions.max()) + 1
            if seq_len > self.args.max_position_embeddings:
                inv_freq = rope.dynamic_ntk_inv_freq(
                    self.args.head_dim, self.args.rope_theta, scaling["factor"], self.args.max_position_embeddings, seq_len
                ).to(inv_freq.device)
        cos, sin = rope.rope_cos_sin(inv_freq, positions, self.rope_scale)
        return inv_freq, cos, sin

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        insert_slice: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, T); attention_mask (B, T_past + T) of 1/0 for left-padded batches.

        ``insert_slice`` computes the LM head for the last position only (prefill for generation).
        """
        x = self.hidden_states(input_ids, cache, attention_mask)
        if insert_slice:
            x = x[:, -1:]
        return self.lm_head(x)  # (B, T, V)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final norm's output (B, T, D): what the LM head reads (long texts score it a slice at a time)."""
        B, T = input_ids.shape
        past = cache.seq_len if cache is not None else 0
        if attention_mask is not None:
            # Position = number of real tokens before this one, so left padding shifts nothing.
            positions = positions_from_mask(attention_mask)[:, past:]  # (B, T)
        else:
            positions = torch.arange(past, past + T, device=input_ids.device)[None]  # (1, T)
        inv_freq, cos, sin = self.rope_tables(positions)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        for block in self.model.layers:
            x = block(x, cos, sin, positions, attention_mask, cache, inv_freq)
        return self.model.norm(x)

    # ---- weights ----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model) -> "Qwen2":
        """Copy the weights of a ``transformers`` ``Qwen2ForCausalLM``."""
        model = cls(Qwen2Args.from_hf(hf_model.config))
        model.load_state_dict(hf_model.state_dict(), strict=False)
        return model.to(next(hf_model.parameters()).dtype)

    @classmethod
    def from_checkpoint(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "Qwen2":
        """Load config.json + (sharded) safetensors from a checkpoint folder."""
        folder = Path(folder)
        model = cls(Qwen2Args.from_config_dict(json.loads((folder / "config.json").read_text())))
        state = {}
        for shard in sorted(folder.glob("*.safetensors")):
            state.update(load_file(shard))
        if model.args.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and model.args.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"{folder}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
        return model.to(dtype)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding with the KV cache: prefill once, then one token per step. (B, T + new)"""
        cache = self.new_cache()
        logits = self(input_ids, cache, insert_slice=True)
        out = [input_ids]
        for _ in range(max_new_tokens):
            next_id = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out.append(next_id)
            if eos_token_id is not None and bool((next_id == eos_token_id).all()):
                break
            logits = self(next_id, cache)
        return torch.cat(out, dim=1)
