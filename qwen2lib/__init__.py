"""qwen2lib: the shared library of the qwen2-workbook notebooks.

Any Hugging Face ``model_type: qwen2`` checkpoint, from "what is inside" to a compiled, quantized,
measured graph. The notebooks are narrative; everything they compute lives here.
"""
import sys

from .errors import (ModelNotFoundError, NumericalOverflowError, PromptTooLongError, Qwen2LibError,
                     UnsupportedDtypeError, WeightsError, WeightsUnavailableError, WrongModelTypeError,
                     show_short_errors)
from .model.loading import checkpoint_dir, load_model, parse_dtype
from .model.registry import ModelSpec, list_models, resolve
from .model.threads import apply_workbook_threads
from .model.tokenizer import load_tokenizer

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


def _short_errors_in_notebooks() -> None:
    """Inside a notebook kernel (IPython is then already imported), errors of ours end a cell in one line."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None:
        show_short_errors(shell)


_short_errors_in_notebooks()
# Every notebook, stage, test and CLI call computes on the cores that are free now (or $QWEN2LIB_THREADS), decided
# here, before anything runs: torch's one thread per core crawls when another process holds a core (model/threads.py).
apply_workbook_threads()
