"""llama.cpp itself behind generation's backend protocol: a GGUF (notebook 06's export, or any Qwen2 GGUF) run by
llama-cpp-python, so ``generate``, the notebooks' hand-off table and the benchmarks time and score it with the
same loop as the torch models and the compiled graphs.

llama-cpp-python is optional (it builds llama.cpp from source, about 6 minutes: ``benchmarks/llamacpp.py`` says
how); ``available()`` says whether it imports. One llama.cpp context holds one sequence, so this backend runs
one unpadded row at a time, and a state is only valid until the next prefill.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch

from ..errors import MissingInputError, Qwen2LibError

INSTALL_HINT = ("pip install llama-cpp-python (builds llama.cpp from source; CMAKE_ARGS=\"-DGGML_NATIVE=ON\" for "
                "this CPU's fastest kernels, see benchmarks/llamacpp.py)")


def available() -> bool:
    """Whether llama-cpp-python imports here."""
    try:
        importlib.import_module("llama_cpp")  # the optional dependency
    except ImportError:
        return False
    return True


class LlamaCppBackend:
    """A ``llama_cpp.Llama`` as a generation backend: prefill / decode return the last position's logits (1, V)."""

    name = "llama.cpp"

    def __init__(self, llm, max_positions: int | None = None, every_position: bool = False):
        self.llm = llm
        self.max_positions = int(max_positions or llm.n_ctx())
        self.every_position = every_position  # the Llama was made with logits_all: ``logits`` can run

    @classmethod
    def load(cls, gguf: str | Path, context: int = 4096, threads: int | None = None,
             every_position: bool = False) -> "LlamaCppBackend":
        """The GGUF file in llama.cpp with a ``context``-token cache; ``every_position`` keeps the logits of every
        prompt position (what ``logits`` needs), not only the last."""
        if not available():
            raise MissingInputError(f"llama.cpp backend: llama-cpp-python is not installed: {INSTALL_HINT}")
        from llama_cpp import Llama  # the optional dependency, checked above

        if not Path(gguf).is_file():
            raise MissingInputError(f"{gguf}: no such GGUF file")
        threads = threads or torch.get_num_threads()
        llm = Llama(model_path=str(gguf), n_ctx=context, n_batch=min(context, 512), logits_all=every_position,
                    n_threads=threads, n_threads_batch=threads, verbose=False)
        return cls(llm, context, every_position)

    def _last(self) -> torch.Tensor:
        """The last evaluated position's logits (1, V), copied out of llama.cpp's buffer (``Llama.scores`` holds them
        only with every_position, and would be n_ctx x V floats: 2.5 GB at 4k tokens of Qwen2's vocabulary)."""
        lib = importlib.import_module("llama_cpp")
        row = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))
        return torch.from_numpy(row.astype(np.float32, copy=True))[None]

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor):
        """``ids`` (1, T), no padding: a fresh sequence (the context's cache is reset)."""
        if ids.shape[0] != 1 or not bool(attention_mask.all()):
            raise Qwen2LibError(f"llama.cpp backend: one unpadded row at a time (got {tuple(ids.shape)}, "
                                f"{int((attention_mask == 0).sum())} padding positions): use batch_size=1")
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        return self._last(), self.llm.n_tokens

    def decode(self, next_ids: torch.Tensor, state: int):
        """One token after the sequence ``state`` (its length) names; only the latest sequence can go on."""
        if state != self.llm.n_tokens:
            raise Qwen2LibError(f"llama.cpp backend: this state ({state} tokens) is not the context's current "
                                f"sequence ({self.llm.n_tokens} tokens): one sequence at a time")
        self.llm.eval([int(next_ids[0, 0])])
        return self._last(), self.llm.n_tokens

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits (B, T, V) in fp32, each row a fresh sequence (``load(..., every_position=True)``)."""
        if not self.every_position:
            raise Qwen2LibError("llama.cpp backend: full-sequence logits need load(..., every_position=True)")
        rows = []
        for row in ids.tolist():
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(row)], dtype=np.float32)))  # (T, V)
        return torch.stack(rows)

    def close(self) -> None:
        """Free llama.cpp's model and context (a closed backend cannot run)."""
        if self.llm is not None:
            self.llm.close()
        self.llm = None
