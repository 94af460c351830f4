"""Patch 6: the quantize() entry point, as the seed's deploy package has it."""
from __future__ import annotations

from ..patch import MODELING_FILE, Edit, Patch, anchored_patch


def quantize_methods_source(target: str) -> str:
    module = f"quantization_{target}"  # the package's own copy of qwen2lib/deploy/quantizer.py
    return f'''
    def quantize(self, *args, **kwargs):
        """Quantize this model for deployment, in place, and return it: `{module}.quantize_model(self, ...)`
        (scheme "w8a16", or "smoothquant" with stats=<calibration folder>). The scheme lives in the package's
        own {module}.py, so it runs with only torch and transformers installed."""
        from .{module} import quantize_model

        return quantize_model(self, *args, **kwargs)

    def save_quantized(self, out_dir, deploy_package=None):
        """Write the quantized package (code, tokenizer, int8 weights) into out_dir; load it again with
        AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)."""
        from .{module} import save_quantized

        return save_quantized(self, out_dir, deploy_package)


class Qwen2ForSequenceClassification('''


def quantize_entry_point_patch(target: str) -> Patch:
    return anchored_patch(
        "quantize_entry_point",
        f"Qwen2ForCausalLM.quantize(*args, **kwargs) and .save_quantized(out_dir): the package's entry points for "
        f"int8, calling its own quantization_{target}.py (a copy of qwen2lib's quantizer, imported when called).",
        MODELING_FILE,
        (Edit("\n\nclass Qwen2ForSequenceClassification(", quantize_methods_source(target)),),
    )
