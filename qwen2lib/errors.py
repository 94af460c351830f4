"""Errors that say what went wrong and what to do; the CLI prints them as one line and exits 2."""


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
