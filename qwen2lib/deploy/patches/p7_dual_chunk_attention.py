"""Patch 7: Dual Chunk Attention, switched on by ``config.dual_chunk_attention_config``.

The patched file must run with torch and transformers only, so the DCA code is written into it here rather than
imported from ``qwen2lib.scratch.dca`` (which stays the reference the tests compare against). The formulation suits an
eager, exportable model: keys are rotated once at ``p mod s`` (s = chunk_size - local_size) and cached that way;
the query is rotated three times (intra: ``p mod s``, successive: ``min(p mod s + s, chunk_size)``, inter:
``chunk_size``), giving three score matrices; each (query, key) pair takes the score of its part, chosen by the
chunk indices of the two positions, and one softmax runs over the result with the usual causal/padding mask.
That is exactly the single softmax over the three parts that the reference merges by log-sum-exp. Inside one
chunk every pair is intra and the query rotation equals the plain one, so the output equals plain attention.
"""
from __future__ import annotations

from ..patch import CONFIGURATION_FILE, MODELING_FILE, Edit, Patch, anchored_patch

DUAL_CHUNK_SOURCE = '''\
@dataclass
class DualChunkRotary:
    """What Dual Chunk Attention needs in every layer, computed once per forward by Qwen2Model.

    key: cos/sin of the new tokens at p mod s, the rotation their keys are cached with.
    queries: cos/sin of the new tokens for the intra, successive and inter parts.
    intra, successive: (batch or 1, 1, query_length, key_length) bool, which part each (query, key) pair is in
    (neither: inter). Causality and padding stay in the additive attention mask.
    """

    key: tuple[torch.Tensor, torch.Tensor]
    queries: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    intra: torch.Tensor
    successive: torch.Tensor


def dual_chunk_settings(config) -> tuple[int, int] | None:
    """(chunk_size, local_size) from config.dual_chunk_attention_config, or None when DCA is off."""
    settings = getattr(config, "dual_chunk_attention_config", None)
    if not settings:
        return None
    missing = [key for key in ("chunk_size", "local_size") if key not in settings]
    if missing:
        raise ValueError(f"dual_chunk_attention_config lacks {missing}: give chunk_size and local_size")
    chunk_size, local_size = int(settings["chunk_size"]), int(settings["local_size"])
    if not 0 <= local_size < chunk_size:
        raise ValueError(f"dual_chunk_attention_config: need 0 <= local_size ({local_size}) < chunk_size ({chunk_size})")
    if getattr(config, "sliding_window", None) is not None:
        raise ValueError("dual_chunk_attention_config and a sliding window cannot be combined: switch one off")
    return chunk_size, local_size


def rotate_by(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, hd) rotated by cos/sin (B, T, hd): one half of apply_rotary_pos_emb."""
    return (x * cos.unsqueeze(1)) + (rotate_half(x) * sin.unsqueeze(1))


def dual_chunk_attention_forward(
    module: nn.Module,
    queries: list[torch.Tensor],
    key: torch.Tensor,
    value: torch.Tensor,
    dual_chunk: DualChunkRotary,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    """eager_attention_forward with one score matrix per DCA part, each pair reading its own part's score."""
    key_states = repeat_kv(key, module.num_key_value_groups).transpose(2, 3)
    value_states = repeat_kv(value, module.num_key_value_groups)

    intra, successive, inter = (torch.matmul(q, key_states) for q in queries)  # (B, H, T, L) each
    attn_weights = torch.where(dual_chunk.intra, intra, torch.where(dual_chunk.successive, successive, inter))
    attn_weights = attn_weights * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(queries[0].dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()

    return attn_output, attn_weights


class Qwen2Attention(nn.Module):'''

DUAL_CHUNK_ROTARY_METHOD = '''\
    def dual_chunk_rotary(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        key_length: int,
    ) -> DualChunkRotary:
        """Rotations and part masks of Dual Chunk Attention for this forward.

        Key j's position is the count of real tokens before it (from the 2D attention_mask, as position_ids
        are), else j. Chunks are s = chunk_size - local_size positions long; a pair is intra when query and
        key share a chunk, successive when the key's chunk is the one before, inter otherwise.
        """
        chunk_size, local_size = dual_chunk_settings(self.config)
        chunk = chunk_size - local_size
        if attention_mask is not None and attention_mask.dim() == 2:
            key_positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -key_length:]  # (B, L)
        else:
            key_positions = torch.arange(key_length, device=position_ids.device)[None, :]  # (1, L)
        in_chunk = position_ids % chunk  # (B or 1, T)
        query_positions = (
            in_chunk,
            torch.clamp(in_chunk + chunk, max=chunk_size),
            torch.full_like(position_ids, chunk_size),
        )
        distance = (position_ids // chunk)[:, None, :, None] - (key_positions // chunk)[:, None, None, :]
        return DualChunkRotary(
            key=self.rotary_emb(hidden_states, in_chunk),
            queries=tuple(self.rotary_emb(hidden_states, p) for p in query_positions),
            intra=distance == 0,
            successive=distance == 1,
        )

    def causal_mask_for(
'''

DUAL_CHUNK_MODELING_EDITS = (
    Edit("\n\nclass Qwen2Attention(nn.Module):", "\n\n" + DUAL_CHUNK_SOURCE),
    Edit(
        "        self.has_sliding_layers = \"sliding_attention\" in self.config.layer_types\n",
        "        self.has_sliding_layers = \"sliding_attention\" in self.config.layer_types\n"
        "        dual_chunk_settings(config)  # a bad dual_chunk_attention_config fails here, not in the first forward\n",
    ),
    Edit(
        """\
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
""",
        """\
        dual_chunk = position_embeddings if isinstance(position_embeddings, DualChunkRotary) else None
        if dual_chunk is not None:
            # Dual Chunk Attention (the model's config decides): keys rotated and cached at p mod s, the query
            # once per part
            queries = [rotate_by(query_states, cos, sin) for cos, sin in dual_chunk.queries]
            key_states = rotate_by(key_states, *dual_chunk.key)
        else:
            cos, sin = position_embeddings
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
""",
    ),
    Edit(
        """\
        attn_output, attn_weights = eager_attention_forward(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
""",
        """\
        if dual_chunk is not None:
            attn_output, attn_weights = dual_chunk_attention_forward(
                self,
                queries,
                key_states,
                value_states,
                dual_chunk,
                attention_mask,
                dropout=0.0 if not self.training else self.attention_dropout,
                scaling=self.scaling,
                **kwargs,
            )
        else:
            attn_output, attn_weights = eager_attention_forward(
                self,
                query_states,
                key_states,
                value_states,
                attention_mask,
                dropout=0.0 if not self.training else self.attention_dropout,
                scaling=self.scaling,
                **kwargs,
            )
""",
    ),
    Edit("    def causal_mask_for(\n", DUAL_CHUNK_ROTARY_METHOD),
    Edit(
        "        position_embeddings = self.rotary_emb(hidden_states, position_ids)\n",
        """\
        if dual_chunk_settings(self.config) is not None:
            position_embeddings = self.dual_chunk_rotary(
                hidden_states, position_ids, attention_mask, past_seen_tokens + inputs_embeds.shape[1]
            )
        else:
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
""",
    ),
)

DUAL_CHUNK_CONFIGURATION_EDITS = (
    Edit(
        '    r"""\n    insert_slice (`bool`',
        '    r"""\n'
        "    dual_chunk_attention_config (`dict`, *optional*):\n"
        "        Dual Chunk Attention (Qwen2.5-1M's key): `chunk_size`, `local_size` (and\n"
        "        `original_max_position_embeddings`, recorded only). Keys are rotated at p mod (chunk_size - local_size),\n"
        "        so no rotary distance passes chunk_size. None: ordinary attention.\n"
        "    insert_slice (`bool`",
    ),
    Edit(
        "    insert_slice: bool = False\n",
        "    insert_slice: bool = False\n"
        "    # Deploy packages: Dual Chunk Attention, on when set (chunk_size, local_size, original_max_position_embeddings)\n"
        "    dual_chunk_attention_config: dict | None = None\n",
    ),
)


def dual_chunk_attention_patches() -> tuple[Patch, Patch]:
    description = (
        "With config.dual_chunk_attention_config ({chunk_size, local_size, original_max_position_embeddings}), "
        "attention is Dual Chunk Attention: keys rotated and cached at p mod (chunk_size - local_size), the query "
        "rotated for the intra-, successive- and inter-chunk parts, each (query, key) pair scored by its part, one "
        "softmax; in prefill and cached decode alike. Without it, nothing changes. The configuration gains the field."
    )
    return (
        anchored_patch("dual_chunk_attention", description, MODELING_FILE, DUAL_CHUNK_MODELING_EDITS),
        anchored_patch("dual_chunk_attention", description, CONFIGURATION_FILE, DUAL_CHUNK_CONFIGURATION_EDITS),
    )
