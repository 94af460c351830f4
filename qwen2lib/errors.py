"""Errors that say what went wrong and what to do; the CLI prints them as one line and exits 2, and in a notebook
(``show_short_errors``) a failing cell ends with that one line too.

Only these (and an OSError naming a path) are the user's: the CLI reports any other exception as an internal error,
exit 1, with its traceback written to a file. So a check of the user's input raises one of these kinds, never a plain
ValueError or FileNotFoundError.
"""
import os


class Qwen2LibError(Exception):
    """Base class: a user-facing problem with an actionable message."""


class ModelNotFoundError(Qwen2LibError, FileNotFoundError):
    pass


class WrongModelTypeError(Qwen2LibError, ValueError):
    pass


class WeightsError(Qwen2LibError, ValueError):
    """Missing, truncated, corrupt or refused (pickle) weights."""


class WeightsUnavailableError(Qwen2LibError, FileNotFoundError):
    """No local copy and no network: the message names the download command."""


class UnsupportedDtypeError(Qwen2LibError, ValueError):
    pass


class PromptTooLongError(Qwen2LibError, ValueError):
    pass


class NumericalOverflowError(Qwen2LibError, FloatingPointError):
    """inf/NaN in activations or logits, e.g. a bf16-trained model run in fp16."""


class InsufficientMemoryError(Qwen2LibError, MemoryError):
    """A stage's estimated resident memory (``qwen2lib.model.footprint``) exceeds what the machine has available."""


class InsufficientDiskError(Qwen2LibError, OSError):
    """A stage would write more than the file system has free."""


class BadInputError(Qwen2LibError, ValueError):
    """An argument, or the content of a file the user named, outside what the library accepts (a sampling option,
    a ShareGPT file of another shape, a folder name that is a path). A plain ValueError is a bug, not this."""


class MissingInputError(Qwen2LibError, FileNotFoundError):
    """A file or folder the user named, or the output of a stage that has to run first, is not there."""


DEBUG_VARIABLE = "QWEN2LIB_DEBUG"


def show_short_errors(shell) -> None:
    """In an IPython shell (a notebook kernel), show a ``Qwen2LibError`` as its one-line message, without the
    traceback (a network error's chained one runs to hundreds of lines). The cell still fails; with
    ``QWEN2LIB_DEBUG=1`` in the environment the full traceback is shown, and ``%tb`` shows it on request."""

    def one_line(shell, etype, value, tb, tb_offset=None):
        if os.environ.get(DEBUG_VARIABLE):
            return shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
        message = f"{etype.__name__}: {str(value).strip().splitlines()[0] if str(value).strip() else ''}"
        return shell._showtraceback(etype, value, [message + f"   (full traceback: %tb, or {DEBUG_VARIABLE}=1)"])

    shell.set_custom_exc((Qwen2LibError,), one_line)
