"""Patch 4: explicit KV cache."""
from __future__ import annotations

from ..patch import MODELING_FILE, CopiedModule, Edit, Patch, patch_with_module

KV_CACHE = CopiedModule(
    "deploy/inserted/kv_cache.py",
    ("Qwen2CausalLMOutputWithPresents", "Qwen2ModelOutputWithPresents", "append_past", "cache_convention",
     "past_length"),
)

PAST_KEY_VALUES_ARGUMENT = (
    "        past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,\n"
)
# auto_docstring wants every argument documented (it prints an [ERROR] line per missing one)
PAST_KEY_VALUES_DOC_ENTRY = """\
        past_key_values (`list[tuple[torch.Tensor, torch.Tensor]]`, *optional*):
            The KV cache as plain tensors: per layer a (key, value) pair, each of shape (batch, num_key_value_heads,
            past, head_dim); `[]` on the first call. The output's `presents` holds the same pairs with the new
            tokens appended: feed them back on the next call. Use this or `cache`, not both.
"""
PAST_KEY_VALUES_DOC = '        r"""\n' + PAST_KEY_VALUES_DOC_ENTRY + '        """\n'

EXPLICIT_KV_CACHE_EDITS = (
    # The decorator renames past_key_values to cache; here past_key_values gets its own meaning.
    Edit("from transformers.utils.deprecation import deprecate_kwarg\n", ""),
    Edit('    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")\n', "", count=4),
    # attention: concatenate the past explicitly and hand the result back
    Edit(
        """\
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
""",
        """\
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
""",
    ),
    Edit(
        """\
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
""",
        """\
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        elif past_key_value is not None:
            key_states, value_states = append_past(past_key_value, key_states, value_states)
        present = (key_states, value_states)
""",
    ),
    Edit(
        "        attn_output = self.o_proj(attn_output)\n        return attn_output, attn_weights\n",
        "        attn_output = self.o_proj(attn_output)\n        return attn_output, attn_weights, present\n",
    ),
    # decoder layer: pass the layer's past in, its present out
    Edit(
        """\
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
""",
        """\
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
""",
    ),
    Edit(
        """\
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
""",
        """\
        hidden_states, _, present = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            past_key_value=past_key_value,
""",
    ),
    Edit(
        "        hidden_states = residual + hidden_states\n        return hidden_states\n",
        "        hidden_states = residual + hidden_states\n        return hidden_states, present\n",
    ),
    # model: choose the convention, collect the presents
    Edit(
        """\
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
""",
        """\
        use_cache: bool | None = None,
"""
        + PAST_KEY_VALUES_ARGUMENT
        + """\
        **kwargs: Unpack[TransformersKwargs],
    ) -> Qwen2ModelOutputWithPresents:
"""
        + PAST_KEY_VALUES_DOC,
    ),
    Edit(
        """\
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
""",
        """\
        # a Cache object passed as past_key_values (the pre-5 spelling) becomes cache; both conventions: refused
        cache, past_key_values = cache_convention(cache, past_key_values, self.config.num_hidden_layers)
        if use_cache and cache is None and past_key_values is None:
            cache = DynamicCache(config=self.config)
""",
    ),
    Edit(
        "        past_seen_tokens = cache.get_seq_length() if cache is not None else 0\n",
        "        past_seen_tokens = past_length(past_key_values, cache)\n",
    ),
    Edit(
        """\
        for i, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask_mapping[self.config.layer_types[i]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
        )
""",
        """\
        # Explicit convention: every layer's (key, value) so far comes back out, one graph output each
        presents = [] if past_key_values is not None else None
        for i, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden_states, present = decoder_layer(
                hidden_states,
                attention_mask=causal_mask_mapping[self.config.layer_types[i]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                past_key_value=past_key_values[i] if past_key_values else None,
                use_cache=use_cache,
                **kwargs,
            )
            if presents is not None:
                presents.append(present)

        hidden_states = self.norm(hidden_states)
        return Qwen2ModelOutputWithPresents(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            presents=presents,
        )
""",
    ),
    # causal LM: same argument, same output
    Edit(
        """\
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
""",
        """\
        logits_to_keep: int | torch.Tensor = 0,
"""
        + PAST_KEY_VALUES_ARGUMENT
        + """\
        **kwargs: Unpack[TransformersKwargs],
    ) -> Qwen2CausalLMOutputWithPresents:
""",
    ),
    Edit('        r"""\n        Example:\n', '        r"""\n' + PAST_KEY_VALUES_DOC_ENTRY + "\n        Example:\n"),
    Edit(
        """\
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
""",
        """\
        outputs: Qwen2ModelOutputWithPresents = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            past_key_values=past_key_values,
""",
    ),
    Edit(
        """\
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
""",
        """\
        return Qwen2CausalLMOutputWithPresents(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            presents=outputs.presents,
        )
""",
    ),
)


def explicit_kv_cache_patch(target: str) -> Patch:
    return patch_with_module(
        "explicit_kv_cache",
        "The KV cache as plain tensors: forward(..., past_key_values=[(k, v) per layer]) with k, v of shape "
        "(batch, kv_heads, past, head_dim) ([] for the first call) returns `presents`, the same list one step "
        "longer, so an exported graph has clear inputs and outputs. cache= (a DynamicCache, what generate uses) "
        "keeps working; the past_key_values -> cache renaming decorator is removed.",
        MODELING_FILE,
        KV_CACHE,
        target,
        EXPLICIT_KV_CACHE_EDITS,
    )


