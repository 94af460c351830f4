"""Patch 6: the quantize() entry point, as the seed's deploy package has it."""
from __future__ import annotations

from ..patch import MODELING_FILE, Edit, Patch, anchored_patch


def quantize_methods_source(target: str) -> str:
    module = f"schemes_{target}"  # the package's own copy of qwen2lib/deploy/schemes.py
    writer = f"quantized_package_{target}"  # and of qwen2lib/deploy/quantized_package.py
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
        from .{writer} import save_quantized

        return save_quantized(self, out_dir, deploy_package)

    @classmethod
    def quantize_checkpoint(cls, deploy_package, out_dir, *args, **kwargs):
        """quantize() then save_quantized() without loading the model: the package's weights are read, quantized
        and written one decoder layer at a time (`{writer}.quantize_checkpoint`), so any size fits in memory."""
        import torch

        from .{writer} import quantize_checkpoint

        config = cls.config_class.from_pretrained(deploy_package)
        with torch.device("meta"):
            skeleton = cls(config)
        return quantize_checkpoint(skeleton, deploy_package, out_dir, *args, **kwargs)


class Qwen2ForSequenceClassification('''


def quantize_entry_point_patch(target: str) -> Patch:
    return anchored_patch(
        "quantize_entry_point",
        f"Qwen2ForCausalLM.quantize(*args, **kwargs), .save_quantized(out_dir) and the streamed "
        f".quantize_checkpoint(package, out_dir, scheme): the package's entry points for int8/int4, calling its own "
        f"quantization_{target}.py, schemes_{target}.py and quantized_package_{target}.py (copies of qwen2lib's "
        f"quantizer, imported when called).",
        MODELING_FILE,
        (Edit("\n\nclass Qwen2ForSequenceClassification(", quantize_methods_source(target)),),
    )
