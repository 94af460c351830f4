"""Patch 7: Dual Chunk Attention, switched on by ``config.dual_chunk_attention_config``.

The code is ``qwen2lib/scratch/dual_chunk.py``, the one torch formulation of DCA (also the fast path of the teaching
``scratch/dca.py``, tested against its naive reference): the package carries it as ``dual_chunk_<target>.py`` and
the edits here are its import line and call sites. Keys are rotated once at ``p mod s`` (s = chunk_size -
local_size) and cached that way; the query is rotated three times (intra, successive, inter), each (query, key)
pair takes the score of its part and one softmax runs over the result with the usual causal/padding mask. Inside
one chunk every pair is intra and the query rotation equals the plain one, so the output equals plain attention.
"""
from __future__ import annotations

from ..patch import CONFIGURATION_FILE, MODELING_FILE, CopiedModule, Edit, Patch, anchored_patch, patch_with_module

DUAL_CHUNK = CopiedModule(
    "scratch/dual_chunk.py",
    ("DualChunkRotary", "dual_chunk_attention_forward", "dual_chunk_rotary", "dual_chunk_settings",
     "rotate_dual_chunk"),
)

DUAL_CHUNK_MODELING_EDITS = (
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
            queries, key_states = rotate_dual_chunk(query_states, key_states, dual_chunk)
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
    Edit(
        "        position_embeddings = self.rotary_emb(hidden_states, position_ids)\n",
        """\
        if dual_chunk_settings(self.config) is not None:
            position_embeddings = dual_chunk_rotary(
                self.rotary_emb, self.config, hidden_states, position_ids, attention_mask,
                past_seen_tokens + inputs_embeds.shape[1],
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


def dual_chunk_attention_patches(target: str) -> tuple[Patch, Patch]:
    description = (
        "With config.dual_chunk_attention_config ({chunk_size, local_size, original_max_position_embeddings}), "
        "attention is Dual Chunk Attention: keys rotated and cached at p mod (chunk_size - local_size), the query "
        "rotated for the intra-, successive- and inter-chunk parts, each (query, key) pair scored by its part, one "
        "softmax; in prefill and cached decode alike. Without it, nothing changes. The configuration gains the field."
    )
    return (
        patch_with_module("dual_chunk_attention", description, MODELING_FILE, DUAL_CHUNK, target,
                          DUAL_CHUNK_MODELING_EDITS),
        anchored_patch("dual_chunk_attention", description, CONFIGURATION_FILE, DUAL_CHUNK_CONFIGURATION_EDITS),
    )
