"""Patch 6: quantize() entry point."""
from __future__ import annotations

from ..patch import MODELING_FILE, Edit, Patch, anchored_patch

# Where Qwen2ForCausalLM.quantize() finds the int8 scheme (looked up by name at call time).
QUANTIZATION_MODULE = "qwen2lib.quantization"
QUANTIZATION_FUNCTION = "quantize_model"


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
            raise ImportError("quantize() runs qwen2lib's int8 schemes: pip install -e <the qwen2-workbook checkout>") from error
        quantize_model = scheme.{QUANTIZATION_FUNCTION}
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
        "(ImportError, saying what to install, where qwen2lib is not installed).",
        MODELING_FILE,
        QUANTIZE_ENTRY_POINT_EDITS,
    )


