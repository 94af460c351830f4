"""One generation loop for every backend: the torch model of any stage and the compiled ONNX graphs.

A backend is anything with ``max_positions`` and two methods, so the loop never knows what runs it:

    prefill(ids (B, T), attention_mask (B, T)) -> logits (B, V) of the last position, state
    decode(next_ids (B, 1), state)              -> logits (B, V), state

``state`` is the backend's own (a KV cache plus the growing attention mask); ``join_states(a, b)`` and
``select_rows(state, rows)`` let the serving engine (``qwen2lib.serve.engine``) splice rows in and out of a running
batch between steps, and ``extend(ids (B, T), state) -> logits, state`` continues a cache with several tokens, so
the engine can prefill a long prompt in chunks (both backends here have them). On top of that the loop
does greedy or sampled decoding (temperature, top-k, top-p, repetition penalty, a seeded
``torch.Generator``), stops on the family's end tokens, left-pads a batch of prompts, streams text
deltas that never split a multi-byte character, and stamps every token with a clock reading so the
benchmark can report TTFT and inter-token latency from the same run.
"""
from __future__ import annotations

import math
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from transformers import DynamicCache

from ..errors import BadInputError, PromptTooLongError, Qwen2LibError
from ..compile.runtime import OnnxCausalLM
from ..compile.runtime import KVState, join_kv, select_kv
from ..scratch.masks import positions_from_mask
from ..scratch.model import Qwen2

# Both of the family's end tokens: base models end documents with <|endoftext|>, chat turns end with
# <|im_end|>. Stopping on either is always right for Qwen2, whatever the checkpoint's config says.
FAMILY_STOP_TOKENS = ("<|endoftext|>", "<|im_end|>")


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    top_k: int = 0  # keep the k most likely tokens (0: off)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p (1: off)
    repetition_penalty: float = 1.0  # CTRL-style: logits of tokens already seen are divided (>0) or multiplied (<0)
    seed: int | None = None  # seeds the sampler's torch.Generator; None draws a fresh seed
    ignore_eos: bool = False  # the benchmark forces each request's output length, as vLLM's does

    def __post_init__(self):
        # each check is written "not <valid>" so that NaN, which fails every comparison, is refused too
        if not self.max_new_tokens >= 1:
            raise BadInputError(f"max_new_tokens={self.max_new_tokens}: ask for at least one new token")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise BadInputError(f"temperature={self.temperature}: use 0 for greedy or a positive value to sample")
        if not self.top_k >= 0:
            raise BadInputError(f"top_k={self.top_k}: use 0 (off) or a positive count")
        if not 0.0 < self.top_p <= 1.0:
            raise BadInputError(f"top_p={self.top_p}: must be in (0, 1]; 1 turns it off")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise BadInputError(f"repetition_penalty={self.repetition_penalty}: must be > 0; 1 turns it off")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    """One request: its tokens, text and when each token arrived (``time.perf_counter`` seconds)."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated; the stop token is kept when it ended the request
    text: str = ""  # the generated text, special tokens skipped
    finish_reason: str = "length"  # "stop" (an end token) or "length" (max_new_tokens)
    start: float = 0.0  # clock when the request's prefill began
    token_times: list[float] = field(default_factory=list)  # clock when each generated token was known

    @property
    def ttft_s(self) -> float:
        """Time to first token: prefill plus the first sampling step."""
        return self.token_times[0] - self.start

    @property
    def e2e_s(self) -> float:
        return self.token_times[-1] - self.start

    @property
    def itl_s(self) -> list[float]:
        """Inter-token latencies: the gaps between consecutive tokens."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (E2E - TTFT) / (n - 1); None for one token."""
        n = len(self.token_ids)
        return (self.e2e_s - self.ttft_s) / (n - 1) if n > 1 else None


class Backend(Protocol):
    max_positions: int

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]: ...

    def decode(self, next_ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]: ...


# ---- torch backend ----------------------------------------------------------------------------

def _left_pad(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """``x`` grown to length ``n`` along ``dim`` by zeros in front (left padding of a cache or mask)."""
    if x.shape[dim] == n:
        return x
    shape = list(x.shape)
    shape[dim] = n - x.shape[dim]
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class TorchBackend:
    """Any ``transformers``-style causal LM: the reference, a deploy package, a quantized package.

    It hands the model its own cache object back each step and passes explicit position ids, so left-padded rows
    get the positions they would have alone.
    """

    name = "torch"

    def __init__(self, model, max_positions: int | None = None):
        if isinstance(model, Qwen2):
            raise Qwen2LibError("qwen2lib.scratch.model.Qwen2 runs through ScratchBackend (or torch_backend(model))")
        self.model = model.eval()
        self.config = model.config
        self.max_positions = int(max_positions or self.config.max_position_embeddings)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_last = "logits_to_keep" in params
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def prefill(self, ids, attention_mask):
        ids, attention_mask = ids.to(self.device), attention_mask.to(self.device)
        kwargs = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask),
                         use_cache=True, **kwargs)
        return out.logits[:, -1].float(), (self._cache_of(out), attention_mask)

    @torch.no_grad()
    def decode(self, next_ids, state):
        cache, attention_mask = state
        next_ids = next_ids.to(self.device)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        position_ids = attention_mask.long().sum(-1, keepdim=True) - 1  # (B, 1)
        out = self.model(input_ids=next_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self._cache_kw: cache})
        return out.logits[:, -1].float(), (self._cache_of(out), attention_mask)

    @torch.no_grad()
    def extend(self, ids, state):
        """``ids`` (B, T) after the state's tokens: the next chunk of a prompt (the serving engine's chunked prefill).
        The same attention over the same cache as one prefill of the whole prompt, so the same logits."""
        cache, attention_mask = state
        ids = ids.to(self.device)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(ids.shape)], dim=1)
        position_ids = positions_from_mask(attention_mask)[:, -ids.shape[1]:]
        kwargs = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                         **{self._cache_kw: cache}, **kwargs)
        return out.logits[:, -1].float(), (self._cache_of(out), attention_mask)

    # Continuous batching (qwen2lib.serve.engine) splices rows in and out of a running state between decode steps.
    def join_states(self, a, b):
        """The rows of ``a`` then ``b`` in one state, the shorter left-padded (mask 0) to the longer's length."""
        (cache_a, mask_a), (cache_b, mask_b) = a, b
        n = max(mask_a.shape[1], mask_b.shape[1])
        layers = [tuple(torch.cat([_left_pad(x, n, 2), _left_pad(y, n, 2)]) for x, y in ((ka, kb), (va, vb)))
                  for (ka, va), (kb, vb) in zip(self._layers(cache_a), self._layers(cache_b))]
        return DynamicCache(layers), torch.cat([_left_pad(mask_a, n, 1), _left_pad(mask_b, n, 1)])

    def select_rows(self, state, rows: list[int]):
        """Only ``rows`` of the state, without the left padding none of them needs any more."""
        cache, mask = state
        index = torch.tensor(rows, dtype=torch.long, device=mask.device)
        mask = mask[index]
        first = int(mask.any(0).nonzero()[0])  # the earliest position some kept row uses
        layers = [(k[index, :, first:], v[index, :, first:]) for k, v in self._layers(cache)]
        return DynamicCache(layers), mask[:, first:]

    def _layers(self, cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not hasattr(cache, "layers"):
            raise Qwen2LibError(f"{type(self.model).__name__}'s cache cannot be split into rows: serve a transformers "
                                "model (load_backend/stage_backend) or a compiled graph")
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _cache_of(self, out):
        for name in ("cache", "past_key_values"):
            value = getattr(out, name, None)
            if value is not None:
                return value
        raise TypeError(f"{type(self.model).__name__} returned no KV cache: it cannot decode incrementally")

    def close(self) -> None:
        """Release the weights (a closed backend cannot run); whoever still holds this object holds no model."""
        self.model = None

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits (B, T, V) in fp32: the ``ids -> logits`` callable of evaluation and fidelity."""
        return self.model(input_ids=ids.to(self.device), use_cache=False).logits.float()


class ScratchBackend:
    """``qwen2lib.scratch.model.Qwen2``, notebook 00's model, with its own ``KVCache`` (rows cannot be spliced: no serving)."""

    name = "torch"

    def __init__(self, model: Qwen2, max_positions: int | None = None):
        self.model = model.eval()
        self.config = model.args
        self.max_positions = int(max_positions or self.config.max_position_embeddings)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def prefill(self, ids, attention_mask):
        ids, attention_mask = ids.to(self.device), attention_mask.to(self.device)
        cache = self.model.new_cache()
        mask = None if bool(attention_mask.all()) else attention_mask
        logits = self.model(ids, cache, attention_mask=mask, insert_slice=True)  # (B, 1, V)
        return logits[:, -1].float(), (cache, attention_mask)

    @torch.no_grad()
    def decode(self, next_ids, state):
        cache, attention_mask = state
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        mask = None if bool(attention_mask.all()) else attention_mask
        return self.model(next_ids.to(self.device), cache, attention_mask=mask)[:, -1].float(), (cache, attention_mask)

    def close(self) -> None:
        self.model = None

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids.to(self.device)).float()


def torch_backend(model, max_positions: int | None = None) -> TorchBackend | ScratchBackend:
    """The backend for a torch model: ``ScratchBackend`` for ``qwen2lib.scratch.model.Qwen2``, else ``TorchBackend``."""
    return (ScratchBackend if isinstance(model, Qwen2) else TorchBackend)(model, max_positions)


# ---- ONNX backend -----------------------------------------------------------------------------

class OnnxBackend:
    """A compiled graph of notebook 04, run by the compile stage's ``OnnxCausalLM`` (explicit KV cache).

    The graph takes ``input_ids``, ``attention_mask`` (1 = token, 0 = left pad), ``position_ids`` and
    ``past_key_values.{i}.key|value`` and returns ``logits`` and ``present.{i}.key|value``; the
    runtime keeps the cache and the mask in its ``KVState``, so this class only converts tensors.
    """

    name = "onnx"
    # onnxruntime's worker threads spin for a while after each call; torch's own pool running the
    # sampling ops meanwhile fights them for the cores, so the loop samples on one thread for this backend.
    sampling_threads = 1

    def __init__(self, runtime, max_positions: int | None = None, in_place: bool = True):
        self.runtime = runtime
        # the graph's rotary table size, capped by the model's own limit when known
        self.max_positions = int(min(runtime.max_positions, max_positions or runtime.max_positions))
        self.in_place = in_place  # False: the cache fed and a fresh copy taken back each step (the plain way)

    @classmethod
    def load(cls, folder: str | Path, config: dict | None = None, threads: int | None = None,
             spinning: bool = True, in_place: bool = True) -> "OnnxBackend":
        """A compiled folder (manifest.json + model.onnx); ``config`` is the model's config.json dict."""
        limit = (config or {}).get("max_position_embeddings")
        return cls(OnnxCausalLM.load(folder, threads=threads, spinning=spinning), limit, in_place)

    def prefill(self, ids, attention_mask):
        logits, state = self.runtime.prefill(ids.numpy(), attention_mask.numpy())
        return torch.from_numpy(logits[:, -1]).float(), state

    def decode(self, next_ids, state):
        logits, state = self.runtime.decode(next_ids.numpy(), state, in_place=self.in_place)
        return torch.from_numpy(logits[:, -1]).float(), state

    def extend(self, ids, state):
        """``ids`` (B, T) after the state's tokens, one graph call over its cache (as the runtime's own chunked
        prefill runs a prompt's pieces); a fresh state, the given one is left as it was."""
        mask = np.concatenate([state.attention_mask, np.ones(tuple(ids.shape), np.int64)], axis=1)
        logits, present = self.runtime.run(ids.numpy(), mask, past=state.past)
        return torch.from_numpy(logits[:, -1]).float(), KVState(present, mask)

    def join_states(self, a, b):
        return join_kv(a, b)

    def select_rows(self, state, rows: list[int]):
        return select_kv(state, rows)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits (B, T, V) in fp32 (a last-position graph is walked token by token)."""
        return self.runtime(ids)

    def close(self) -> None:
        """Release the onnxruntime session and its weights (a closed backend cannot run)."""
        self.runtime = None


# ---- prompts and stop tokens ------------------------------------------------------------------

def stop_token_ids(tokenizer=None, config=None) -> set[int]:
    """The family's end tokens present in the vocabulary, plus whatever the config and tokenizer name."""
    ids: set[int] = set()
    if config is not None:
        eos = config.get("eos_token_id") if isinstance(config, dict) else getattr(config, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in FAMILY_STOP_TOKENS if t in vocab)
    return ids


def encode_prompt(tokenizer, prompt, chat: bool = False) -> list[int]:
    """Text (or a chat message list) -> token ids; ``chat`` wraps a text in the tokenizer's chat template."""
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], int):
        return list(prompt)
    if isinstance(prompt, (list, tuple)):  # chat messages [{"role": ..., "content": ...}]
        chat, messages = True, list(prompt)
    else:
        messages = [{"role": "user", "content": str(prompt)}]
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise BadInputError("this tokenizer has no chat template: drop --chat/chat=True or use an -Instruct model")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(str(prompt), add_special_tokens=False)


def fit_prompt(ids: list[int], max_new_tokens: int, max_positions: int, truncate: str | None = None,
               index: int = 0) -> list[int]:
    """Refuse (or, with ``truncate="left"``, cut) a prompt that would run past the model's positions."""
    if not ids:
        raise BadInputError(f"prompt {index} is empty: give at least one token")
    if len(ids) + max_new_tokens <= max_positions:
        return ids
    room = max_positions - max_new_tokens
    if truncate == "left" and room > 0:
        return ids[-room:]
    if truncate not in (None, "left"):
        raise BadInputError(f"truncate={truncate!r}: use None (refuse) or 'left' (keep the last tokens)")
    raise PromptTooLongError(
        f"prompt {index} has {len(ids)} tokens and max_new_tokens={max_new_tokens}: {len(ids) + max_new_tokens} "
        f"positions, but the model has {max_positions} (max_position_embeddings or the compiled graph's limit). "
        + (f"Shorten the prompt, lower max_new_tokens, or pass truncate='left' to keep its last {room} tokens"
           if room > 0 else f"lower max_new_tokens below {max_positions}")
    )


# ---- sampling ---------------------------------------------------------------------------------

def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to logits (B, V), in the order HF does.

    Tokens ruled out get -inf, so softmax of the result is the distribution that is sampled.
    """
    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        probs, order = top_probabilities(logits.softmax(-1), params.top_p)  # (B, k) descending, their ids
        # Keep a token while the more likely ones have not yet reached top_p (the most likely is always kept).
        keep_sorted = (probs.cumsum(-1) - probs) < params.top_p
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, keep_sorted)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def top_probabilities(probs: torch.Tensor, mass: float, first: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely entries of each row of ``probs`` (B, V), in descending order with their ids, enough of them
    that every row's running sum reaches ``mass`` (all V at worst). The same prefix a full sort gives (ties aside),
    without sorting Qwen's 151,936 tokens when a few hundred hold the mass, as they do in a trained model's output."""
    k = min(first, probs.shape[-1])
    while True:
        top, order = probs.topk(k, dim=-1)  # (B, k), sorted
        if k == probs.shape[-1] or bool((top.cumsum(-1)[:, -1] >= mass).all()):
            return top, order
        k = min(8 * k, probs.shape[-1])


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``probs`` (B, V), by inverting the cumulative distribution at a uniform number.
    Token i is drawn with probability p_i, as ``torch.multinomial`` draws it, from one uniform number, a cumulative
    sum and a binary search, which is several times faster at Qwen's vocabulary (benchmarks/README, serving); the
    draws for a given generator state differ from multinomial's."""
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand((probs.shape[0], 1), generator=generator, dtype=cdf.dtype) * cdf[:, -1:]  # (B, 1) in [0, total)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)  # (B,)


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,): argmax when greedy, else a draw from ``generator``."""
    logits = process_logits(logits, params, seen)
    if params.greedy:
        return logits.argmax(-1)
    return sample_rows(logits.softmax(-1), generator)


# ---- incremental detokenisation ---------------------------------------------------------------

class TextStream:
    """Text deltas as tokens arrive; the concatenation always equals decoding all tokens at once.

    Byte-level BPE can split one character over several tokens (a rare CJK character, an emoji);
    a decode that ends in U+FFFD is an unfinished character, so its text is held back until the
    bytes that complete it arrive. Only the tokens since the last emitted boundary are re-decoded.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window re-decoded for context
        self.read_offset = 0  # tokens whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip) if ids else ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        emitted = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(emitted):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (the output ended inside a character)."""
        emitted = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(emitted):]


# ---- the loop ---------------------------------------------------------------------------------

@torch.no_grad()
def _steps(backend: Backend, prompts: list[list[int]], params: SamplingParams, stops: set[int],
           max_new: list[int], completions: list[Completion], pad_id: int) -> Iterator[tuple[int, int]]:
    """Run one left-padded batch; fill ``completions`` in place and yield (row, token) as they arrive."""
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, T - len(prompt):] = torch.tensor(prompt)
        mask[row, T - len(prompt):] = 1
    generator = None
    if not params.greedy:
        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
    threads = getattr(backend, "sampling_threads", None)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield from _decode(backend, prompts, ids, mask, params, stops, max_new, completions, pad_id, generator)
    finally:
        torch.set_num_threads(previous_threads)


@torch.no_grad()
def _decode(backend, prompts, ids, mask, params, stops, max_new, completions, pad_id, generator):
    """Prefill ids/mask (B, T), then one decode step per token until every row has finished."""
    B = len(prompts)
    start = time.perf_counter()
    for c in completions:
        c.start = start
    logits, state = backend.prefill(ids, mask)
    seen = None  # (B, V): tokens of each row's prompt and output, for the repetition penalty
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(logits.shape, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            seen[row, prompt] = True
    active = [True] * B
    for _ in range(max(max_new)):
        chosen = next_tokens(logits, params, generator, seen)  # (B,)
        now = time.perf_counter()
        for row in range(B):
            if not active[row]:
                continue
            token = int(chosen[row])
            c = completions[row]
            c.token_ids.append(token)
            c.token_times.append(now)
            if token in stops and not params.ignore_eos:
                c.finish_reason, active[row] = "stop", False
            elif len(c.token_ids) >= max_new[row]:
                c.finish_reason, active[row] = "length", False
            yield row, token
        if not any(active):
            return
        if seen is not None:
            seen.scatter_(1, chosen[:, None], True)
        feed = torch.tensor([int(chosen[r]) if active[r] else pad_id for r in range(B)])[:, None]  # (B, 1)
        logits, state = backend.decode(feed, state)


def _prepare(backend, tokenizer, prompts, params, chat, truncate, max_new_tokens):
    single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], (int, dict)))
    items = [prompts] if single else list(prompts)
    if not items:
        raise ValueError("no prompts given")
    if isinstance(max_new_tokens, int) or max_new_tokens is None:
        max_new = [max_new_tokens or params.max_new_tokens] * len(items)
    else:
        max_new = [int(m) for m in max_new_tokens]
        if len(max_new) != len(items):
            raise ValueError(f"{len(max_new)} max_new_tokens for {len(items)} prompts")
    ids = []
    for i, (item, n) in enumerate(zip(items, max_new)):
        if tokenizer is None and not (isinstance(item, (list, tuple)) and all(isinstance(t, int) for t in item)):
            raise ValueError("without a tokenizer, prompts must be lists of token ids")
        encoded = list(item) if tokenizer is None else encode_prompt(tokenizer, item, chat)
        ids.append(fit_prompt(encoded, n, backend.max_positions, truncate, i))
    return single, ids, max_new


def generate(backend: Backend, tokenizer, prompts, params: SamplingParams | None = None, *, chat: bool = False,
             truncate: str | None = None, max_new_tokens: int | Sequence[int] | None = None,
             stop_ids: set[int] | None = None, on_text: Callable[[int, str], None] | None = None,
             batch_size: int | None = None):
    """Complete one prompt (-> ``Completion``) or a list of them (-> list, left-padded batches).

    prompts: text, a chat message list, token ids, or a list of those. ``tokenizer`` may be None
    when prompts are token ids (text is then left empty). ``max_new_tokens`` overrides
    ``params.max_new_tokens``, per prompt if a list. ``on_text(index, delta)`` streams text.
    """
    params = params or SamplingParams()
    single, ids, max_new = _prepare(backend, tokenizer, prompts, params, chat, truncate, max_new_tokens)
    stops = stop_ids if stop_ids is not None else stop_token_ids(tokenizer, getattr(backend, "config", None))
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    completions = [Completion(prompt_ids=p) for p in ids]
    batch_size = batch_size or len(ids)
    for first in range(0, len(ids), batch_size):
        rows = slice(first, first + batch_size)
        streams = [TextStream(tokenizer) for _ in ids[rows]] if tokenizer is not None else None
        for row, token in _steps(backend, ids[rows], params, stops, max_new[rows], completions[rows], pad_id):
            if streams is not None:
                delta = streams[row].push(token)
                if delta and on_text is not None:
                    on_text(first + row, delta)
        for row, c in enumerate(completions[rows]):
            if streams is not None:
                tail = streams[row].flush()
                if tail and on_text is not None:
                    on_text(first + row, tail)
                c.text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
    return completions[0] if single else completions


def stream(backend: Backend, tokenizer, prompt, params: SamplingParams | None = None, *, chat: bool = False,
           truncate: str | None = None, stop_ids: set[int] | None = None) -> Iterator[str]:
    """Yield the text of one prompt's completion as it is generated, delta by delta."""
    params = params or SamplingParams()
    single, ids, max_new = _prepare(backend, tokenizer, prompt, params, chat, truncate, None)
    if not single:
        raise ValueError("stream() takes one prompt; use generate(..., on_text=...) for a batch")
    stops = stop_ids if stop_ids is not None else stop_token_ids(tokenizer, getattr(backend, "config", None))
    text = TextStream(tokenizer)
    completion = [Completion(prompt_ids=ids[0])]
    for _, token in _steps(backend, ids[:1], params, stops, max_new[:1], completion, tokenizer.pad_token_id or 0):
        delta = text.push(token)
        if delta:
            yield delta
    tail = text.flush()
    if tail:
        yield tail
