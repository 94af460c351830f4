"""Stage 1: patch Hugging Face's own Qwen2 source into a deploy package, as code instead of a hand-edited copy.

The deployment guide this workbook follows edits ``modeling_qwen2.py`` before compiling. Here each edit
is a named ``Patch``: a short description plus a ``str -> str`` transformation of the source text of the
installed transformers. Applying them in order records every patch's own diff, so a notebook can show
exactly what changed and why, and a patch whose anchor text no longer matches a newer transformers
fails loudly (naming the patch and the version it was written for) instead of silently drifting.

The patches, in order:

  relative_imports       ``from ...x`` -> ``from transformers.x``; the config import points at the package's
                         own ``configuration_qwen2_<target>.py`` (so it runs as ``trust_remote_code`` code)
  no_runtime_dispatch    no hub kernels swapped in, no output-capture hooks: what you read is what runs
  eager_attention        eager attention only, causal / sliding-window mask from arange and comparisons
  explicit_kv_cache      ``past_key_values=[(k, v), ...]`` in, ``presents`` out: graph inputs and outputs
  insert_slice           with ``config.insert_slice``, only the last position goes through ``lm_head``
  quantize_entry_point   ``Qwen2ForCausalLM.quantize()`` delegating to ``qwen2lib.quantization``

Patch 6 of the guide, Dual Chunk Attention, is a TODO hook (``dual_chunk_attention_patch`` raises).

``build_deploy_package`` writes the patched files, a ``config.json`` whose ``auto_map`` points at them,
the tokenizer files and symlinks to the weights; ``prove_package`` checks its logits against upstream;
``ensure_patched`` is what later stages call to get ``<workdir>/patched/`` without running notebook 01.
"""
from __future__ import annotations

import difflib
import hashlib
import html
import json
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .artifacts import default_workdir, read_metrics, stage_dir, write_metrics
from .errors import ModelNotFoundError, Qwen2LibError, WeightsError, WrongModelTypeError
from .loading import checkpoint_dir
from .stages import ensure_stage, recorded_request

# The transformers release whose qwen2 source the anchors below were copied from.
PATCHES_WRITTEN_FOR = "5.24.0"

MODELING_FILE = "modeling_qwen2.py"
CONFIGURATION_FILE = "configuration_qwen2.py"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
WEIGHT_INDEX_FILE = "model.safetensors.index.json"

# Where Qwen2ForCausalLM.quantize() finds the int8 scheme (looked up by name at call time).
QUANTIZATION_MODULE = "qwen2lib.quantization"
QUANTIZATION_FUNCTION = "quantize_model"


class PatchAnchorError(Qwen2LibError, RuntimeError):
    """A patch's anchor text is not (exactly once) in the upstream source: transformers changed under it."""


# ---- patches ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """One documented transformation of one upstream file's source text."""

    name: str
    description: str
    file: str  # the upstream file it edits: MODELING_FILE or CONFIGURATION_FILE
    apply: Callable[[str], str] = field(repr=False)


@dataclass(frozen=True)
class Edit:
    """Replace ``anchor`` (which must occur exactly ``count`` times) by ``replacement``."""

    anchor: str
    replacement: str
    count: int = 1


@dataclass(frozen=True)
class AppliedPatch:
    """A patch together with the text before and after it: its own diff."""

    patch: Patch
    before: str
    after: str

    @property
    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                self.before.splitlines(keepends=True),
                self.after.splitlines(keepends=True),
                fromfile=f"a/{self.patch.file}",
                tofile=f"b/{self.patch.file}",
            )
        )

    @property
    def lines_added(self) -> int:
        return sum(1 for line in self.diff.splitlines() if line.startswith("+") and not line.startswith("+++"))

    @property
    def lines_removed(self) -> int:
        return sum(1 for line in self.diff.splitlines() if line.startswith("-") and not line.startswith("---"))


def installed_transformers_version() -> str:
    import transformers

    return transformers.__version__


def anchor_error(patch_name: str, file: str, problem: str) -> PatchAnchorError:
    return PatchAnchorError(
        f"patch {patch_name!r} no longer matches {file} of the installed transformers "
        f"{installed_transformers_version()}: {problem}. The patches were written for transformers "
        f"{PATCHES_WRITTEN_FOR}: install transformers=={PATCHES_WRITTEN_FOR}, or update the anchor of "
        f"{patch_name!r} in qwen2lib/patching.py to the new source."
    )


def apply_edits(source: str, edits: Sequence[Edit], *, patch_name: str, file: str) -> str:
    for edit in edits:
        found = source.count(edit.anchor)
        if found != edit.count:
            first_line = edit.anchor.strip().splitlines()[0]
            problem = f"expected {edit.count} occurrence(s) of {first_line!r}, found {found}"
            raise anchor_error(patch_name, file, problem)
        source = source.replace(edit.anchor, edit.replacement)
    return source


def anchored_patch(name: str, description: str, file: str, edits: Sequence[Edit]) -> Patch:
    edits = tuple(edits)
    return Patch(name, description, file, lambda source: apply_edits(source, edits, patch_name=name, file=file))


def apply_patches(source: str, patches: Sequence[Patch]) -> tuple[str, list[AppliedPatch]]:
    """Apply ``patches`` in order; each one's diff is taken against the output of the one before."""
    applied = []
    for patch in patches:
        patched = patch.apply(source)
        applied.append(AppliedPatch(patch, source, patched))
        source = patched
    return source, applied


# -- 1. relative imports -----------------------------------------------------------------------

PARENT_PACKAGE_IMPORT = re.compile(r"^from \.\.\.(\w[\w.]*) import ", flags=re.MULTILINE)
OWN_CONFIG_IMPORT = "from .configuration_qwen2 import "


def rewrite_relative_imports(source: str, *, target: str, file: str) -> str:
    # Inside transformers the file is transformers/models/qwen2/x.py; as remote code it sits alone in a
    # model folder, so "..." means nothing there and the config module carries the target suffix.
    if not PARENT_PACKAGE_IMPORT.search(source):
        raise anchor_error("relative_imports", file, "no 'from ...module import' lines to rewrite")
    source = PARENT_PACKAGE_IMPORT.sub(r"from transformers.\1 import ", source)
    if file == MODELING_FILE:
        if source.count(OWN_CONFIG_IMPORT) != 1:
            raise anchor_error("relative_imports", file, f"expected one {OWN_CONFIG_IMPORT.strip()!r} line")
        source = source.replace(OWN_CONFIG_IMPORT, f"from .configuration_qwen2_{target} import ")
    leftover = re.findall(r"^from \.\S* import .*$", source, flags=re.MULTILINE)
    unexpected = [line for line in leftover if not line.startswith(f"from .configuration_qwen2_{target} import ")]
    if unexpected:
        problem = f"relative imports left that a model folder cannot resolve: {unexpected}"
        raise anchor_error("relative_imports", file, problem)
    return source


def relative_imports_patch(file: str, target: str) -> Patch:
    return Patch(
        "relative_imports",
        "Make the file importable from a model folder (trust_remote_code): `from ...x import` becomes "
        f"`from transformers.x import`, and `.configuration_qwen2` becomes the package's own "
        f"`.configuration_qwen2_{target}`.",
        file,
        lambda source: rewrite_relative_imports(source, target=target, file=file),
    )


# -- 2. no run-time dispatch -------------------------------------------------------------------

NO_RUNTIME_DISPATCH_EDITS = (
    Edit("from transformers.integrations import use_kernel_forward_from_hub, use_kernelized_func\n", ""),
    Edit('@use_kernel_forward_from_hub("rotary_pos_emb")\ndef apply_rotary_pos_emb(', "def apply_rotary_pos_emb("),
    Edit(
        "@use_kernelized_func(apply_rotary_pos_emb)\nclass Qwen2Attention(nn.Module):",
        "class Qwen2Attention(nn.Module):",
    ),
    Edit('@use_kernel_forward_from_hub("RMSNorm")\nclass Qwen2RMSNorm(nn.Module):', "class Qwen2RMSNorm(nn.Module):"),
    Edit(
        "from transformers.utils.generic import merge_with_config_defaults\n"
        "from transformers.utils.output_capturing import capture_outputs\n",
        "",
    ),
    Edit("    @merge_with_config_defaults\n    @capture_outputs\n    @auto_docstring\n", "    @auto_docstring\n"),
    Edit(
        "        if use_cache and cache is None:\n",
        "        if use_cache is None:\n"
        "            # merge_with_config_defaults (removed) used to fill this in\n"
        "            use_cache = self.config.use_cache\n"
        "        if use_cache and cache is None:\n",
    ),
)


def no_runtime_dispatch_patch() -> Patch:
    return anchored_patch(
        "no_runtime_dispatch",
        "Remove the decorators that change the code at run time: hub kernels that may replace RMSNorm and "
        "the rotary embedding, and the output-capture hooks (ContextVar based, which tracers cannot follow). "
        "The forward you read is the forward that runs; output_hidden_states/output_attentions are not supported.",
        MODELING_FILE,
        NO_RUNTIME_DISPATCH_EDITS,
    )


# -- 3. eager attention, explicit mask ---------------------------------------------------------

BUILD_CAUSAL_MASK_SOURCE = '''\
def build_causal_mask(
    attention_mask: torch.Tensor | None,
    past_length: int,
    query_length: int,
    key_length: int,
    key_offset: int,
    sliding_window: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Additive mask of shape (batch or 1, 1, query_length, key_length): 0 where a query may look, dtype min elsewhere.

    Query i sits at position past_length + i and key j at key_offset + j (a sliding-window cache may have
    dropped the oldest keys). A query sees the keys at or before its own position, with a sliding window
    only the last `sliding_window` of them, and never a key whose 2D `attention_mask` entry is 0 (padding).
    Built from arange and comparisons so that an exported graph shows the mask, not a library call.
    """
    query_positions = torch.arange(query_length, device=device) + past_length
    key_positions = torch.arange(key_length, device=device) + key_offset
    visible = key_positions[None, :] <= query_positions[:, None]
    if sliding_window is not None:
        visible = visible & (key_positions[None, :] > query_positions[:, None] - sliding_window)
    visible = visible[None, None, :, :]
    if attention_mask is not None:
        key_is_token = attention_mask[:, key_offset : key_offset + key_length].to(torch.bool)
        visible = visible & key_is_token[:, None, None, :]
    return torch.where(visible, torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min)


'''

CAUSAL_MASK_FOR_SOURCE = '''
    def causal_mask_for(
        self,
        layer_type: str,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        past_length: int,
        cache: Cache | None,
    ) -> torch.Tensor:
        """The additive mask every layer of `layer_type` ("full_attention" or "sliding_attention") uses."""
        query_length = inputs_embeds.shape[1]
        if cache is not None:
            # A sliding-window Cache returns only its last keys: ask it which positions they are
            key_length, key_offset = cache.get_mask_sizes(query_length, self.config.layer_types.index(layer_type))
        else:
            key_length, key_offset = past_length + query_length, 0
        sliding_window = self.config.sliding_window if layer_type == "sliding_attention" else None
        return build_causal_mask(
            attention_mask,
            past_length,
            query_length,
            key_length,
            key_offset,
            sliding_window,
            dtype=inputs_embeds.dtype,
            device=inputs_embeds.device,
        )
'''

EAGER_ATTENTION_EDITS = (
    Edit("from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask\n", ""),
    Edit("from transformers.modeling_flash_attention_utils import FlashAttentionKwargs\n", ""),
    Edit(
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep\n",
        "from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep\n",
    ),
    Edit("def eager_attention_forward(\n", BUILD_CAUSAL_MASK_SOURCE + "def eager_attention_forward(\n"),
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
        # The sliding window is part of the mask (build_causal_mask), not an argument of a kernel.
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
        # One additive mask per layer type, built once from plain tensor ops (see build_causal_mask)
        causal_mask_mapping = {
            layer_type: self.causal_mask_for(layer_type, attention_mask, inputs_embeds, past_seen_tokens, cache)
            for layer_type in dict.fromkeys(self.config.layer_types)
        }
""",
    ),
)


def eager_attention_patch() -> Patch:
    return anchored_patch(
        "eager_attention",
        "Eager attention only (no ALL_ATTENTION_FUNCTIONS dispatch, no sdpa/flash/flex), and the causal and "
        "sliding-window masks built in the file by build_causal_mask from arange and comparisons instead of "
        "transformers.masking_utils, so an exporter sees plain tensor ops.",
        MODELING_FILE,
        EAGER_ATTENTION_EDITS,
    )


# -- 4. explicit KV cache ----------------------------------------------------------------------

PRESENTS_OUTPUT_SOURCE = '''\
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


class Qwen2MLP(nn.Module):
'''

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
    Edit(
        "from collections.abc import Callable\n",
        "from collections.abc import Callable\nfrom dataclasses import dataclass\n",
    ),
    Edit("class Qwen2MLP(nn.Module):\n", PRESENTS_OUTPUT_SOURCE),
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
            key_states = torch.cat([past_key_value[0], key_states], dim=-2)
            value_states = torch.cat([past_key_value[1], value_states], dim=-2)
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
        if isinstance(past_key_values, Cache):
            # Before transformers 5 the Cache object was called past_key_values: keep those callers working
            cache, past_key_values = past_key_values, None
        if cache is not None and past_key_values is not None:
            raise ValueError(
                "pass either cache= (a transformers Cache) or past_key_values= (a list of (key, value) tensors "
                "per layer; [] for the first call), not both"
            )
        if past_key_values and len(past_key_values) != self.config.num_hidden_layers:
            raise ValueError(
                f"past_key_values has {len(past_key_values)} (key, value) pairs; the model has "
                f"{self.config.num_hidden_layers} layers"
            )
        if use_cache and cache is None and past_key_values is None:
            cache = DynamicCache(config=self.config)
""",
    ),
    Edit(
        "        past_seen_tokens = cache.get_seq_length() if cache is not None else 0\n",
        """\
        if past_key_values is not None:
            past_seen_tokens = past_key_values[0][0].shape[-2] if past_key_values else 0
        else:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
""",
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


def explicit_kv_cache_patch() -> Patch:
    return anchored_patch(
        "explicit_kv_cache",
        "The KV cache as plain tensors: forward(..., past_key_values=[(k, v) per layer]) with k, v of shape "
        "(batch, kv_heads, past, head_dim) ([] for the first call) returns `presents`, the same list one step "
        "longer, so an exported graph has clear inputs and outputs. cache= (a DynamicCache, what generate uses) "
        "keeps working; the past_key_values -> cache renaming decorator is removed.",
        MODELING_FILE,
        EXPLICIT_KV_CACHE_EDITS,
    )


# -- 5. insert_slice ---------------------------------------------------------------------------

INSERT_SLICE_MODELING_EDITS = (
    Edit(
        """\
        hidden_states = outputs.last_hidden_state
        hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
""",
        """\
        hidden_states = outputs.last_hidden_state
        if getattr(self.config, "insert_slice", False):
            # Only the last position's logits choose the next token: slicing before lm_head saves
            # (T - 1) * hidden * vocab multiply-adds in prefill, a large share of a small model's work.
            if labels is not None:
                raise ValueError(
                    "insert_slice keeps only the last position's logits, so no loss: set config.insert_slice=False"
                )
            hidden_states = hidden_states[:, -1:, :]
        else:
            hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
""",
    ),
)

INSERT_SLICE_CONFIGURATION_EDITS = (
    Edit(
        '    r"""\n    Example:\n',
        '    r"""\n'
        "    insert_slice (`bool`, *optional*, defaults to `False`):\n"
        "        Slice the hidden states to the last position before `lm_head` (prefill computes one row of logits).\n"
        "\n    Example:\n",
    ),
    Edit(
        "    eos_token_id: int | list[int] | None = None\n",
        "    eos_token_id: int | list[int] | None = None\n"
        "    # Deploy packages (qwen2lib.patching): slice the hidden states to the last position before lm_head\n"
        "    insert_slice: bool = False\n",
    ),
)


def insert_slice_patches() -> tuple[Patch, Patch]:
    description = (
        "When config.insert_slice is true, the hidden states are sliced to the last position before lm_head, "
        "so prefill computes 1 row of logits instead of T; the configuration gains an insert_slice field "
        "(default False)."
    )
    return (
        anchored_patch("insert_slice", description, MODELING_FILE, INSERT_SLICE_MODELING_EDITS),
        anchored_patch("insert_slice", description, CONFIGURATION_FILE, INSERT_SLICE_CONFIGURATION_EDITS),
    )


# -- 6. quantize() entry point -----------------------------------------------------------------

QUANTIZE_METHOD_SOURCE = f'''
    def quantize(self, *args, **kwargs):
        """Quantize this model for deployment; returns what the scheme returns (the quantized model).

        The scheme is not part of this file: it is
        `{QUANTIZATION_MODULE}.{QUANTIZATION_FUNCTION}(model, *args, **kwargs)`, looked up by name when
        called so that the package loads without qwen2lib installed.
        """
        try:
            scheme = importlib.import_module("{QUANTIZATION_MODULE}")
        except ModuleNotFoundError as error:
            if error.name != "{QUANTIZATION_MODULE}":
                raise ImportError("quantize() needs qwen2lib: pip install -e <the qwen2-workbook checkout>") from error
            raise NotImplementedError(
                "{QUANTIZATION_MODULE} does not exist yet: the int8 scheme lands with the quantization stage"
            ) from error
        quantize_model = getattr(scheme, "{QUANTIZATION_FUNCTION}", None)
        if quantize_model is None:
            raise NotImplementedError("{QUANTIZATION_MODULE} has no {QUANTIZATION_FUNCTION}() yet")
        return quantize_model(self, *args, **kwargs)


class Qwen2ForSequenceClassification('''

QUANTIZE_ENTRY_POINT_EDITS = (
    Edit("from collections.abc import Callable\n", "import importlib\nfrom collections.abc import Callable\n"),
    Edit("\n\nclass Qwen2ForSequenceClassification(", QUANTIZE_METHOD_SOURCE),
)


def quantize_entry_point_patch() -> Patch:
    return anchored_patch(
        "quantize_entry_point",
        f"Qwen2ForCausalLM.quantize(*args, **kwargs): the package's entry point for int8, delegating to "
        f"{QUANTIZATION_MODULE}.{QUANTIZATION_FUNCTION}(model, ...) looked up by name at call time "
        "(NotImplementedError while that stage has not landed, ImportError without qwen2lib).",
        MODELING_FILE,
        QUANTIZE_ENTRY_POINT_EDITS,
    )


# -- 7. dual chunk attention (not yet) ---------------------------------------------------------


def dual_chunk_attention_patch() -> Patch:
    # TODO(issue 4, patch 6): route attention through qwen2lib/dca.py's dual_chunk_attention when
    # config.dual_chunk_attention_config is set. Not written yet.
    raise NotImplementedError(
        "patch 6 (dual chunk attention) is not written yet; build the package with dual_chunk_attention=False"
    )


# -- the lists -----------------------------------------------------------------------------------


def check_target(target: str) -> str:
    # The target becomes part of two module names (modeling_qwen2_<target>.py)
    if not re.fullmatch(r"[a-z][a-z0-9_]*", target):
        raise ValueError(f"target={target!r}: use a lowercase identifier such as 'onnx'")
    return target


def modeling_patches(target: str = "onnx", *, dual_chunk_attention: bool = False) -> list[Patch]:
    check_target(target)
    patches = [
        relative_imports_patch(MODELING_FILE, target),
        no_runtime_dispatch_patch(),
        eager_attention_patch(),
        explicit_kv_cache_patch(),
        insert_slice_patches()[0],
        quantize_entry_point_patch(),
    ]
    if dual_chunk_attention:
        patches.append(dual_chunk_attention_patch())
    return patches


def configuration_patches(target: str = "onnx") -> list[Patch]:
    check_target(target)
    return [relative_imports_patch(CONFIGURATION_FILE, target), insert_slice_patches()[1]]


# ---- applying them to the installed transformers ---------------------------------------------


@dataclass(frozen=True)
class PatchedSources:
    target: str
    modeling: str
    configuration: str
    applied: list[AppliedPatch]

    @property
    def modeling_filename(self) -> str:
        return f"modeling_qwen2_{self.target}.py"

    @property
    def configuration_filename(self) -> str:
        return f"configuration_qwen2_{self.target}.py"


def upstream_source(filename: str) -> str:
    """Source text of ``transformers/models/qwen2/<filename>`` as installed."""
    import transformers.models.qwen2 as qwen2_package

    return (Path(qwen2_package.__file__).parent / filename).read_text(encoding="utf-8")


def generated_header(upstream_file: str, applied: Sequence[AppliedPatch]) -> str:
    names = ", ".join(a.patch.name for a in applied if a.patch.file == upstream_file)
    return (
        f"# Generated by qwen2lib.patching from transformers {installed_transformers_version()} "
        f"models/qwen2/{upstream_file}\n"
        f"# Patches applied in order: {names}.\n"
        "# Do not edit by hand: change the patch in qwen2lib/patching.py and rebuild the package.\n"
    )


def patched_sources(
    target: str = "onnx",
    *,
    modeling_source: str | None = None,
    configuration_source: str | None = None,
    dual_chunk_attention: bool = False,
) -> PatchedSources:
    """Apply every patch to the installed transformers' qwen2 files (or to the texts given, for tests)."""
    modeling, modeling_applied = apply_patches(
        upstream_source(MODELING_FILE) if modeling_source is None else modeling_source,
        modeling_patches(target, dual_chunk_attention=dual_chunk_attention),
    )
    configuration, configuration_applied = apply_patches(
        upstream_source(CONFIGURATION_FILE) if configuration_source is None else configuration_source,
        configuration_patches(target),
    )
    applied = modeling_applied + configuration_applied
    return PatchedSources(
        target=target,
        modeling=generated_header(MODELING_FILE, applied) + modeling,
        configuration=generated_header(CONFIGURATION_FILE, applied) + configuration,
        applied=applied,
    )


# ---- the deploy package ----------------------------------------------------------------------


def read_checkpoint_config(checkpoint: Path) -> dict:
    """config.json of a qwen2 checkpoint folder, with errors that say what to do."""
    if not checkpoint.is_dir():
        raise ModelNotFoundError(
            f"{checkpoint} is not a folder: pass a checkpoint folder, e.g. qwen2lib.checkpoint_dir('tiny')"
        )
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{checkpoint} has no config.json: pass a Hugging Face checkpoint folder "
            "(config.json + *.safetensors), e.g. qwen2lib.checkpoint_dir('tiny')"
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type != "qwen2":
        raise WrongModelTypeError(
            f"{config_path} has model_type {model_type!r}: these patches are for model_type 'qwen2' "
            "(Qwen2 / Qwen2.5 checkpoints); pick a qwen2 checkpoint"
        )
    return config


def weight_files_of(checkpoint: Path) -> list[Path]:
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise WeightsError(
            f"{checkpoint} has no *.safetensors weights: save the model with save_pretrained "
            "(safetensors is the default) or convert its pytorch_model.bin first"
        )
    index = checkpoint / WEIGHT_INDEX_FILE
    return files + ([index] if index.is_file() else [])


def package_auto_map(target: str) -> dict[str, str]:
    return {
        "AutoConfig": f"configuration_qwen2_{target}.Qwen2Config",
        "AutoModelForCausalLM": f"modeling_qwen2_{target}.Qwen2ForCausalLM",
    }


def package_config(checkpoint_config: dict, target: str, insert_slice: bool) -> dict:
    config = dict(checkpoint_config)
    config["architectures"] = ["Qwen2ForCausalLM"]
    config["auto_map"] = package_auto_map(target)
    config["_attn_implementation"] = "eager"
    config["insert_slice"] = bool(insert_slice)
    return config


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_tokenizer_files(checkpoint: Path, package: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, package / name)
            copied.append(name)
    return copied


def link_weights(weight_files: Sequence[Path], package: Path) -> list[str]:
    # Symlinks, not copies: a 7B package would otherwise double 15 GB of disk for no change in bytes
    for source in weight_files:
        os.symlink(source.resolve(), package / source.name)
    return [source.name for source in weight_files]


def patches_summary(sources: PatchedSources) -> dict:
    return {
        "transformers_version": installed_transformers_version(),
        "patches_written_for": PATCHES_WRITTEN_FOR,
        "target": sources.target,
        "patches": [
            {
                "name": a.patch.name,
                "file": a.patch.file,
                "description": a.patch.description,
                "lines_added": a.lines_added,
                "lines_removed": a.lines_removed,
            }
            for a in sources.applied
        ],
    }


def check_not_inside(out: Path, checkpoint: Path) -> None:
    # atomic_dir replaces the output folder: it must never be the checkpoint itself
    out, checkpoint = out.resolve(), checkpoint.resolve()
    if out == checkpoint or checkpoint in out.parents or out in checkpoint.parents:
        raise ValueError(f"out_dir {out} overlaps the checkpoint folder {checkpoint}: write the package elsewhere")


def build_deploy_package(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    target: str = "onnx",
    insert_slice: bool = False,
    dual_chunk_attention: bool = False,
    force: bool = True,
    verbose: bool = False,
) -> Path:
    """Write a deploy package folder (atomically, as the ``patched`` stage) and return its path.

    It holds the patched ``modeling_qwen2_<target>.py`` / ``configuration_qwen2_<target>.py``, a
    ``config.json`` whose ``auto_map`` points at them, the tokenizer files (copied), the weights
    (absolute symlinks into ``checkpoint_dir``), ``patches.json`` and ``metrics.json`` (with the stage
    record of ``qwen2lib.stages``). Load it with ``load_deploy_package`` (code checked, then
    ``AutoModelForCausalLM.from_pretrained(package, trust_remote_code=True)``). ``force=False`` reuses a
    package built from the same checkpoint, settings and patch code.
    """
    checkpoint = Path(checkpoint_dir)
    out = Path(out_dir)
    checkpoint_config = read_checkpoint_config(checkpoint)
    weight_files = weight_files_of(checkpoint)
    check_not_inside(out, checkpoint)
    check_target(target)
    request = {"target": target, "insert_slice": bool(insert_slice), "dual_chunk_attention": dual_chunk_attention,
               "transformers_version": installed_transformers_version()}

    def build(package: Path) -> dict:
        sources = patched_sources(target, dual_chunk_attention=dual_chunk_attention)
        (package / sources.modeling_filename).write_text(sources.modeling, encoding="utf-8")
        (package / sources.configuration_filename).write_text(sources.configuration, encoding="utf-8")
        write_json(package / "config.json", package_config(checkpoint_config, target, insert_slice))
        tokenizer_files = copy_tokenizer_files(checkpoint, package)
        linked = link_weights(weight_files, package)
        summary = patches_summary(sources)
        write_json(package / "patches.json", summary)
        metrics = build_metrics(checkpoint, summary, target, insert_slice, tokenizer_files, linked)
        metrics["generated_code"] = verify_package_code(package)
        return metrics

    return ensure_stage("patched", out, request, {"checkpoint": checkpoint}, build, force=force, verbose=verbose)


def ensure_patched(
    model: str = "tiny",
    weights: str = "auto",
    workdir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    target: str = "onnx",
    insert_slice: bool | None = None,
    verbose: bool = True,
) -> Path:
    """The deploy package in ``<workdir>/patched/``, reused when built from this checkpoint with these settings
    and this checkout's patches, else (re)built (``qwen2lib.stages`` says why).

    Later stages call this so they run without notebook 01 having run first. ``insert_slice=None`` keeps
    whatever an existing package has (False for a new one). No proof is run here: see ``prove_package``.
    """
    package = stage_dir(workdir or default_workdir(model), "patched")
    checkpoint = Path(checkpoint_dir(model, weights, seed))
    if insert_slice is None:
        insert_slice = bool((recorded_request(package) or {}).get("insert_slice", False))
    return build_deploy_package(checkpoint, package, target=target, insert_slice=insert_slice, force=False,
                                verbose=verbose)


class PackageCodeError(Qwen2LibError, RuntimeError):
    """A package folder's Python files are not what qwen2lib generates: they are never imported."""


def package_target(package: Path) -> str:
    """The ``<target>`` of ``configuration_qwen2_<target>.py``, from the package's auto_map."""
    config = json.loads((package / "config.json").read_text(encoding="utf-8"))
    entry = str((config.get("auto_map") or {}).get("AutoConfig", ""))
    match = re.fullmatch(r"configuration_qwen2_([a-z][a-z0-9_]*)\.Qwen2Config", entry)
    if not match:
        raise PackageCodeError(f"{package / 'config.json'}: auto_map.AutoConfig is {entry!r}, not the "
                               "configuration_qwen2_<target>.Qwen2Config a deploy package names; rebuild it (notebook 01)")
    return match.group(1)


def expected_package_code(package: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """{file name: text} of every Python file the package may hold, regenerated by this checkout."""
    sources = patched_sources(package_target(package))
    return {sources.modeling_filename: sources.modeling, sources.configuration_filename: sources.configuration,
            **(extra or {})}


def code_digests(files: dict[str, str]) -> dict[str, str]:
    return {name: hashlib.sha256(text.encode("utf-8")).hexdigest() for name, text in sorted(files.items())}


def verify_package_code(package: str | os.PathLike, extra: dict[str, str] | None = None,
                        auto_map: dict[str, str] | None = None) -> dict[str, str]:
    """Check, before anything is imported with ``trust_remote_code``, that every ``*.py`` in the package is
    byte for byte what this checkout generates, and that config.json's auto_map names only those modules.

    A copied or shared run folder can hold anything: a line appended to a generated file would otherwise
    run on load. Returns {file: sha256}. Raises PackageCodeError naming the first file that differs.
    """
    package = Path(package)
    expected = expected_package_code(package, extra)
    for path in sorted(package.glob("*.py")):
        if path.name not in expected:
            raise PackageCodeError(f"{path} is not a file qwen2lib generates: refusing to load {package} with "
                                   "trust_remote_code; delete the folder and rebuild it")
        if path.read_bytes() != expected[path.name].encode("utf-8"):
            raise PackageCodeError(f"{path} differs from what this checkout generates (edited, or built by another "
                                   "version): refusing to run it; delete the folder and rebuild the stage")
    config = json.loads((package / "config.json").read_text(encoding="utf-8"))
    wanted_map = auto_map if auto_map is not None else package_auto_map(package_target(package))
    if config.get("auto_map") != wanted_map:
        raise PackageCodeError(f"{package / 'config.json'}: auto_map {config.get('auto_map')} is not {wanted_map}: "
                               "refusing to load; delete the folder and rebuild it")
    missing = [n for n in wanted_map.values() if not (package / (n.split(".")[0] + ".py")).is_file()]
    if missing:
        raise PackageCodeError(f"{package} lacks the module(s) its auto_map names ({', '.join(missing)}): rebuild it")
    return code_digests(expected)


def build_metrics(checkpoint: Path, summary: dict, target: str, insert_slice: bool,
                  tokenizer_files: list[str], linked: list[str]) -> dict:
    return {
        "checkpoint": str(checkpoint.resolve()),
        "target": target,
        "insert_slice": insert_slice,
        "transformers_version": summary["transformers_version"],
        "patches": len(summary["patches"]),
        "lines_added": sum(p["lines_added"] for p in summary["patches"]),
        "lines_removed": sum(p["lines_removed"] for p in summary["patches"]),
        "tokenizer_files": tokenizer_files,
        "weight_links": linked,
    }


def record_metrics(package_dir: str | os.PathLike, key: str, figures: dict) -> None:
    metrics = read_metrics(package_dir)
    metrics[key] = figures
    write_metrics(package_dir, metrics)


# ---- report: diffs and the summary table -----------------------------------------------------

DIFF_STYLES = {
    "+": "color:#116329;background:#dafbe1",
    "-": "color:#82071e;background:#ffebe9",
    "@": "color:#6e7781",
}


def patch_report(applied: Sequence[AppliedPatch]) -> str:
    """Plain text: each patch's name, description and unified diff (for terminals and logs)."""
    parts = []
    for a in applied:
        heading = f"## {a.patch.name} ({a.patch.file}, +{a.lines_added} -{a.lines_removed})"
        parts.append(f"{heading}\n{a.patch.description}\n\n{a.diff}")
    return "\n".join(parts)


def diff_html(diff_text: str) -> str:
    """A unified diff as coloured HTML (green added, red removed lines) for a notebook."""
    lines = []
    for line in diff_text.splitlines():
        is_header = line.startswith("+++") or line.startswith("---")
        style = "font-weight:bold" if is_header else DIFF_STYLES.get(line[:1], "")
        lines.append(f'<span style="{style}">{html.escape(line)}</span>')
    body = "\n".join(lines)
    return f'<pre style="font-size:12px;line-height:1.3;overflow-x:auto">{body}</pre>'


def patch_html(applied_patch: AppliedPatch) -> str:
    a = applied_patch
    counts = f"{html.escape(a.patch.file)}, +{a.lines_added} &minus;{a.lines_removed}"
    heading = f"<h4>{html.escape(a.patch.name)} <small>({counts})</small></h4>"
    return heading + f"<p>{html.escape(a.patch.description)}</p>" + diff_html(a.diff)


def show_patch_diffs(applied: Sequence[AppliedPatch]) -> None:
    """Display every patch's coloured diff in Jupyter (prints the text report elsewhere)."""
    try:
        from IPython.display import HTML, display
    except ImportError:
        print(patch_report(applied))
        return
    for a in applied:
        display(HTML(patch_html(a)))


def patch_table(applied: Sequence[AppliedPatch]):
    """pandas DataFrame: patch, file, description, +lines, -lines."""
    import pandas as pd

    return pd.DataFrame(
        [
            {"patch": a.patch.name, "file": a.patch.file, "description": a.patch.description,
             "+lines": a.lines_added, "-lines": a.lines_removed}
            for a in applied
        ]
    )


# ---- proof: the package computes what upstream computes --------------------------------------


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype={dtype!r}: use float32, bfloat16 or float16")
    return resolved


def load_deploy_package(package_dir: str | os.PathLike, dtype: str | torch.dtype = torch.float32):
    """The patched model from a package folder: remote code from the folder (checked first against what this
    checkout generates: ``verify_package_code``), nothing downloaded."""
    from transformers import AutoModelForCausalLM

    verify_package_code(package_dir)
    model = AutoModelForCausalLM.from_pretrained(
        str(package_dir), trust_remote_code=True, local_files_only=True, dtype=resolve_dtype(dtype)
    )
    return model.eval()


def load_reference(checkpoint_dir: str | os.PathLike, dtype: str | torch.dtype = torch.float32,
                   attention: str = "eager"):
    """Upstream ``Qwen2ForCausalLM`` from the checkpoint folder."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(
        str(checkpoint_dir), local_files_only=True, dtype=resolve_dtype(dtype), attn_implementation=attention
    )
    return model.eval()


def as_batch(prompt_ids) -> torch.Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty 1D or (1, T) sequence of token ids, not shape {tuple(ids.shape)}")
    return ids


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def compare_prompt_logits(patched, reference, prompt: torch.Tensor) -> dict:
    ours = patched(prompt, past_key_values=[]).logits
    theirs = reference(prompt, use_cache=False).logits
    figures = {"last_position_logits_max_abs_diff": max_abs_diff(ours[:, -1], theirs[:, -1])}
    if ours.shape == theirs.shape:  # insert_slice off: every position
        figures["prompt_logits_max_abs_diff"] = max_abs_diff(ours, theirs)
    return figures


def compare_cached_decode(patched, reference, prompt: torch.Tensor, decode_steps: int) -> dict:
    """Greedy decode with upstream's DynamicCache and the package's explicit tensors, same tokens fed to both."""
    from transformers import DynamicCache

    theirs = reference(prompt, cache=DynamicCache(config=reference.config), use_cache=True)
    ours = patched(prompt, past_key_values=[])
    worst = 0.0
    for _ in range(decode_steps):
        next_token = theirs.logits[:, -1:].argmax(-1)  # the reference chooses, so one tie cannot fork the paths
        theirs = reference(next_token, cache=theirs.cache, use_cache=True)
        ours = patched(next_token, past_key_values=ours.presents)
        worst = max(worst, max_abs_diff(ours.logits[:, -1], theirs.logits[:, -1]))
    return {"decode_logits_max_abs_diff": worst}


def compare_generate(patched, reference, prompt: torch.Tensor, decode_steps: int) -> dict:
    """HF generate() (DynamicCache path) on both: the same greedy tokens."""
    settings = dict(max_new_tokens=decode_steps, do_sample=False, attention_mask=torch.ones_like(prompt))
    ours = patched.generate(prompt, **settings)
    theirs = reference.generate(prompt, **settings)
    return {
        "generate_tokens_equal": bool(torch.equal(ours, theirs)),
        "generated_tokens": int(theirs.shape[1] - prompt.shape[1]),
    }


def prove_package(
    package_dir: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    prompt_ids,
    decode_steps: int = 16,
    *,
    dtype: str | torch.dtype = "float32",
    reference_attention: str = "eager",
    tolerance: float = 1e-5,
    record: bool = True,
) -> dict:
    """Compare the package with upstream ``Qwen2ForCausalLM`` on the same checkpoint.

    Logits over the prompt (only the last position when the package has insert_slice on), then
    ``decode_steps`` cached greedy steps (upstream DynamicCache vs the package's explicit tensors),
    then ``generate``. Returns max abs differences; with ``record`` they go into the package's metrics.json
    under "proof". The reference runs eager attention by default, the same algorithm, so any difference
    comes from the patches and not from a kernel choice.
    """
    prompt = as_batch(prompt_ids)
    patched = load_deploy_package(package_dir, dtype)
    reference = load_reference(checkpoint_dir, dtype, reference_attention)
    with torch.inference_mode():
        proof = {
            "dtype": str(resolve_dtype(dtype)).removeprefix("torch."),
            "reference_attention": reference_attention,
            "insert_slice": bool(getattr(patched.config, "insert_slice", False)),
            "prompt_tokens": int(prompt.shape[1]),
            "decode_steps": decode_steps,
            **compare_prompt_logits(patched, reference, prompt),
            **compare_cached_decode(patched, reference, prompt, decode_steps),
            **compare_generate(patched, reference, prompt, decode_steps),
        }
    differences = [v for k, v in proof.items() if k.endswith("_max_abs_diff")]
    proof["tolerance"] = tolerance
    proof["passed"] = max(differences) <= tolerance and proof["generate_tokens_equal"]
    if record:
        record_metrics(package_dir, "proof", proof)
    return proof


# ---- insert_slice: what it saves -------------------------------------------------------------


def lm_head_flops(tokens: int, hidden_size: int, vocab_size: int) -> int:
    # one multiply and one add per weight per token
    return 2 * tokens * hidden_size * vocab_size


def time_prefill(model, prompt: torch.Tensor, repeats: int) -> float:
    """Median seconds of one explicit-cache prefill (after one warm-up call)."""
    with torch.inference_mode():
        model(prompt, past_key_values=[])
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(prompt, past_key_values=[])
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure_insert_slice(
    package_dir: str | os.PathLike,
    prompt_tokens: int = 512,
    *,
    repeats: int = 3,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    record: bool = True,
) -> dict:
    """Prefill time and lm_head FLOPs for a ``prompt_tokens`` prompt with insert_slice off and on.

    lm_head FLOPs: 2 * T * hidden * vocab without the slice, 2 * hidden * vocab with it. The same loaded
    model is timed both ways (config.insert_slice is read at call time), on seeded random token ids.
    """
    model = load_deploy_package(package_dir, dtype)
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    prompt = torch.randint(vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    seconds = {}
    for insert_slice in (False, True):
        model.config.insert_slice = insert_slice
        seconds[insert_slice] = time_prefill(model, prompt, repeats)
    figures = {
        "prompt_tokens": prompt_tokens,
        "hidden_size": hidden,
        "vocab_size": vocab,
        "torch_threads": torch.get_num_threads(),
        "prefill_ms_without_slice": 1000 * seconds[False],
        "prefill_ms_with_slice": 1000 * seconds[True],
        "prefill_speedup": seconds[False] / seconds[True],
        "lm_head_flops_without_slice": lm_head_flops(prompt_tokens, hidden, vocab),
        "lm_head_flops_with_slice": lm_head_flops(1, hidden, vocab),
    }
    if record:
        record_metrics(package_dir, "insert_slice", figures)
    return figures


def insert_slice_table(figures: dict):
    """The measure_insert_slice figures as a two-row pandas DataFrame."""
    import pandas as pd

    rows = []
    for label, suffix in (("off", "without_slice"), ("on", "with_slice")):
        rows.append({
            "insert_slice": label,
            "prompt tokens": figures["prompt_tokens"],
            "logit rows": figures["prompt_tokens"] if label == "off" else 1,
            "lm_head GFLOPs": figures[f"lm_head_flops_{suffix}"] / 1e9,
            "prefill ms": figures[f"prefill_ms_{suffix}"],
        })
    return pd.DataFrame(rows)


# ---- command line ------------------------------------------------------------------------------


def cmd_patch(args) -> int:
    from .cli import workdir_of
    from .loading import checkpoint_dir

    checkpoint = checkpoint_dir(args.model, args.weights, args.seed)
    package = build_deploy_package(checkpoint, stage_dir(workdir_of(args), "patched"),
                                   target=args.target, insert_slice=args.insert_slice)
    print(f"[patch] wrote {package}", file=sys.stderr)
    if not args.no_proof:
        prompt = torch.randint(json.loads((package / "config.json").read_text())["vocab_size"], (1, 32),
                               generator=torch.Generator().manual_seed(args.seed))
        proof = prove_package(package, checkpoint, prompt, dtype=args.dtype)
        print(json.dumps(proof, indent=2))
        if not proof["passed"]:
            return 1
    return 0


def register_cli(sub) -> None:
    from .cli import add_model_args

    p = sub.add_parser("patch", help="deploy package (patched transformers Qwen2 source) -> <workdir>/patched/")
    add_model_args(p)
    p.add_argument("--target", default="onnx", help="suffix of the patched files (default: onnx)")
    p.add_argument("--insert-slice", action="store_true", help="slice to the last position before lm_head")
    p.add_argument("--no-proof", action="store_true", help="skip the logits comparison with upstream")
    p.set_defaults(func=cmd_patch)
