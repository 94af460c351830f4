"""Patch 2: no run-time dispatch."""
from __future__ import annotations

from ..patch import MODELING_FILE, Edit, Patch, anchored_patch


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


