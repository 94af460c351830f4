"""Patch 3: eager attention, explicit mask."""
from __future__ import annotations

from ..patch import MODELING_FILE, CopiedModule, Edit, Patch, patch_with_module

CAUSAL_MASK = CopiedModule("deploy/inserted/causal_mask.py", ("layer_causal_mask",))

# Qwen2Model keeps a causal_mask_for method: the package's GPTQ calibration (schemes.py) builds its masks with it
CAUSAL_MASK_FOR_SOURCE = '''
    def causal_mask_for(self, layer_type, attention_mask, inputs_embeds, past_length, cache) -> torch.Tensor:
        """The additive mask every layer of `layer_type` ("full_attention" or "sliding_attention") uses."""
        return layer_causal_mask(self.config, layer_type, attention_mask, inputs_embeds, past_length, cache)
'''

EAGER_ATTENTION_EDITS = (
    Edit("from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask\n", ""),
    Edit("from transformers.modeling_flash_attention_utils import FlashAttentionKwargs\n", ""),
    Edit(
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep\n",
        "from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep\n",
    ),
    Edit("        **kwargs: Unpack[FlashAttentionKwargs],\n", "        **kwargs: Unpack[TransformersKwargs],\n"),
    Edit(
        """\
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )

        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,  # main diff with Llama
            **kwargs,
        )
""",
        """\
        # Eager only, whatever config._attn_implementation says: matmul, add mask, softmax, matmul.
        # The sliding window is part of the mask (layer_causal_mask), not an argument of a kernel.
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
        "    _supports_flash_attn = True\n    _supports_sdpa = True\n    _supports_flex_attn = True\n",
        "    # Attention is computed by eager_attention_forward in this file, so no other backend may be chosen\n"
        "    _supports_flash_attn = False\n    _supports_sdpa = False\n    _supports_flex_attn = False\n",
    ),
    Edit("    _supports_attention_backend = True\n", "    _supports_attention_backend = False\n"),
    Edit(
        "        self.has_sliding_layers = \"sliding_attention\" in self.config.layer_types\n\n"
        "        # Initialize weights and apply final processing\n"
        "        self.post_init()\n",
        "        self.has_sliding_layers = \"sliding_attention\" in self.config.layer_types\n\n"
        "        # Initialize weights and apply final processing\n"
        "        self.post_init()\n" + CAUSAL_MASK_FOR_SOURCE,
    ),
    Edit(
        """\
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids""",
        """\
        past_seen_tokens = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids""",
    ),
    Edit(
        """\
        # It may already have been prepared by e.g. `generate`
        if not isinstance(causal_mask_mapping := attention_mask, dict):
            # Prepare mask arguments
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                "cache": cache,
                "position_ids": position_ids,
            }
            # Create the masks
            causal_mask_mapping = {
                "full_attention": create_causal_mask(**mask_kwargs),
            }
            # The sliding window alternating layers are not always activated depending on the config
            if self.has_sliding_layers:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
""",
        """\
        # One additive mask per layer type, built once from plain tensor ops (layer_causal_mask)
        causal_mask_mapping = {
            layer_type: self.causal_mask_for(layer_type, attention_mask, inputs_embeds, past_seen_tokens, cache)
            for layer_type in dict.fromkeys(self.config.layer_types)
        }
""",
    ),
)


def eager_attention_patch(target: str) -> Patch:
    return patch_with_module(
        "eager_attention",
        "Eager attention only (no ALL_ATTENTION_FUNCTIONS dispatch, no sdpa/flash/flex), and the causal and "
        "sliding-window masks built by layer_causal_mask from arange and comparisons instead of "
        "transformers.masking_utils, so an exporter sees plain tensor ops.",
        MODELING_FILE,
        CAUSAL_MASK,
        target,
        EAGER_ATTENTION_EDITS,
    )


