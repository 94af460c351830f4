"""Where qwen2lib keeps what it builds once: the family tokenizers and the embedded ``tiny`` model."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$QWEN2LIB_CACHE``, else ``$XDG_CACHE_HOME/qwen2lib``, else ``~/.cache/qwen2lib``."""
    if os.environ.get("QWEN2LIB_CACHE"):
        return Path(os.environ["QWEN2LIB_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "qwen2lib"


def local_models_root() -> Path | None:
    """``$QWEN2LIB_MODELS``: a folder of checkpoints named like the registry (``Qwen2-1.5B/``)."""
    value = os.environ.get("QWEN2LIB_MODELS")
    return Path(value).expanduser() if value else None
