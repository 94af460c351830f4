"""qwen2lib: the shared library of the qwen2-workbook notebooks.

Any Hugging Face ``model_type: qwen2`` checkpoint, from "what is inside" to a compiled, quantized,
measured graph. The notebooks are narrative; everything they compute lives here.
"""
from .errors import (
    ModelNotFoundError,
    NumericalOverflowError,
    PromptTooLongError,
    Qwen2LibError,
    UnsupportedDtypeError,
    WeightsError,
    WeightsUnavailableError,
    WrongModelTypeError,
)
from .loading import checkpoint_dir, load_model, parse_dtype
from .registry import ModelSpec, list_models, resolve
from .tokenizer import load_tokenizer

__all__ = [
    "ModelNotFoundError",
    "ModelSpec",
    "NumericalOverflowError",
    "PromptTooLongError",
    "Qwen2LibError",
    "UnsupportedDtypeError",
    "WeightsError",
    "WeightsUnavailableError",
    "WrongModelTypeError",
    "checkpoint_dir",
    "list_models",
    "load_model",
    "load_tokenizer",
    "parse_dtype",
    "resolve",
]
__version__ = "0.1.0"
