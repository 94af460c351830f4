"""Continuous batching over any generation backend: requests join the running batch at decode-step boundaries.

One engine thread owns the model. Between two decode steps it (1) cuts out the rows whose client went
away, (2) prefills up to ``prefill_chunk`` prompt tokens of the requests it admits while the batch and the KV
budget allow, and (3) runs one decode step for every row, emitting each row's token as soon as it is sampled.
A row leaves the moment it finishes.

How a request joins: its prompt is prefilled alone (batch 1, no padding), its first token goes out, and
its KV cache is spliced into the running state, left-padded to the batch's common length
(``backend.join_states``); a row that leaves is cut out and the left padding no remaining row needs is
trimmed (``backend.select_rows``).
Positions come from the attention mask, so every row sees the positions it would have alone. The cost
of a join is one prefill of the newcomer's prompt plus one copy of the batch's cache (memory traffic,
no recomputation), where re-prefilling the batch would recompute every running row's tokens. Waiting requests
are prefilled one by one, not as one padded batch: on the compiled graph (CPU) a batch of prompts measured no
faster than the same prompts one at a time, and padding short prompts to the longest only adds work.

Chunked prefill: a step feeds at most ``prefill_chunk`` prompt tokens, so a long prompt is prefilled over several
steps, its chunks continuing its own cache (``backend.extend``), and the running rows get a token at every one of
those steps instead of waiting for the whole prompt (prefilled at once, ~1k-token prompts held every stream for
their whole prefill: ITL p99 1.3 s, where llama-server, which also feeds prompts in pieces, had 0.2 s). The step's
budget goes first to the request being prefilled, then to the next waiting ones, so short prompts still join
together; one request at most is left half-prefilled between steps. Its first token is sampled after its last
chunk; the chunks give the logits the whole prompt gives at once (the same attention over the same cache, up to
float rounding).

Events leave in bursts (a prefill's first token; a step's token for every row), each followed by the
``on_burst`` hook, so a consumer on another thread (the HTTP server's event loop) is woken once per burst.

KV budget: the cache holds rows x common length slots, padding included. A request is admitted only
if the peak of that product over the rest of the batch's life (rows leave as they finish; the longest
row sets the length) stays within ``kv_budget_tokens``; requests are served first come, first served. A request
prefilled in chunks is counted from its admission, at its whole prompt's length, for the steps until it joins too.
"""
from __future__ import annotations

import threading
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import BadInputError, Qwen2LibError
from .generation import SamplingParams, fit_prompt, next_tokens


class QueueFullError(Qwen2LibError):
    """The engine's waiting queue is full: the server answers 429 and the client retries later."""


class RequestTooLargeError(Qwen2LibError, ValueError):
    """A request that could never fit the engine's KV budget, even alone."""


@dataclass
class EngineConfig:
    max_batch: int = 8  # rows decoded together (llama.cpp's slots, vLLM's max_num_seqs)
    kv_budget_tokens: int = 16384  # KV cache slots (rows x padded length) the batch may hold at its peak
    max_queue: int = 256  # requests waiting for a slot; one more is refused (HTTP 429)
    # prompt tokens prefilled per step (see the module's docstring); 256 is what a compiled graph runs per call
    # anyway (compile.runtime.PREFILL_CHUNK), so chunking adds no graph calls; a value above the longest prompt
    # turns chunking off
    prefill_chunk: int = 256

    def __post_init__(self):
        for name in ("max_batch", "kv_budget_tokens", "max_queue", "prefill_chunk"):
            if int(getattr(self, name)) < 1:
                raise BadInputError(f"{name}={getattr(self, name)}: must be at least 1")


@dataclass
class Event:
    """What the engine tells a request's owner, from the engine thread: a token, the end, or a failure."""

    token: int | None = None
    time: float = 0.0
    finish_reason: str | None = None  # "stop", "length" or "cancelled" on the request's last event
    error: str | None = None


@dataclass(eq=False)
class ServeRequest:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]  # called on the engine thread; must not block
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # (1, V) tokens of prompt and output, for the repetition penalty

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.output)

    @property
    def cached(self) -> int:
        """Tokens in the KV cache: the prompt and every output token but the last (fed at the next step)."""
        return len(self.prompt_ids) + max(len(self.output) - 1, 0)


@dataclass(eq=False)
class _Prefilling:
    """The request whose prompt is being prefilled over several steps, and its own cache so far."""

    request: ServeRequest
    state: Any = None  # the backend's state after ``done`` prompt tokens
    done: int = 0


def peak_kv_slots(rows: list[tuple[int, ...]]) -> int:
    """Peak of rows x common length over the batch's life; rows are (tokens cached now, steps left), or
    (tokens, steps left, steps before it joins) for a request still being prefilled.

    After s more steps the rows with at least s steps left remain, and the longest of them sets the
    length; between two rows' ends the product only grows, so the peak sits at some row's last step.
    A row that joins after d steps counts from now at its whole prompt's length and lives d steps longer:
    more than it holds, never less.
    """
    rows = [(row[0], row[1], row[2] if len(row) > 2 else 0) for row in rows]
    peak = 0
    for s in sorted({left + delay for _, left, delay in rows}):
        alive = [cached + max(s - delay, 0) for cached, left, delay in rows if left + delay >= s]
        peak = max(peak, len(alive) * max(alive))
    return peak


class Engine:
    """The continuous batcher. ``submit`` and ``cancel`` may be called from any thread."""

    def __init__(self, backend, stop_ids: set[int], config: EngineConfig | None = None,
                 on_burst: Callable[[], None] | None = None):
        for method in ("join_states", "select_rows"):
            if not hasattr(backend, method):
                raise Qwen2LibError(f"{type(backend).__name__} has no {method}(): continuous batching needs a backend "
                                    "whose state can be split into rows (TorchBackend, OnnxBackend)")
        self.backend = backend
        self.stop_ids = set(stop_ids)
        self.config = config or EngineConfig()
        # called on the engine thread after each burst of on_event calls (a prefill's first token, a step's tokens
        # for every row): a consumer that queues events can wake its reader once per burst, not once per token
        self.on_burst = on_burst
        self._cond = threading.Condition()
        self._waiting: deque[ServeRequest] = deque()
        self._rows: list[ServeRequest] = []
        self._state = None
        self._filling: _Prefilling | None = None  # admitted, its prompt not yet whole in its cache
        # a backend that cannot continue a cache with several tokens prefills each prompt at once
        self._chunked = hasattr(backend, "extend")
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._live = weakref.WeakSet()  # every request not yet garbage: a leak shows up here
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "tokens": 0, "peak_batch": 0}

    # ---- the API --------------------------------------------------------------------------------
    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise the one-line reason a request can never be served (too long for the model or the budget)."""
        fit_prompt(prompt_ids, params.max_new_tokens, self.backend.max_positions)
        need = len(prompt_ids) + params.max_new_tokens
        if need > self.config.kv_budget_tokens:
            raise RequestTooLargeError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_new_tokens}) = "
                                       f"{need} exceeds the server's KV budget of {self.config.kv_budget_tokens} tokens; "
                                       "lower max_tokens or restart the server with a larger --kv-budget")

    def submit(self, request: ServeRequest) -> ServeRequest:
        self.check(request.prompt_ids, request.params)
        params = request.params
        if not params.greedy:
            seed = params.seed if params.seed is not None else torch.seed()
            request.generator = torch.Generator().manual_seed(seed)
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting (--max-queue "
                                     f"{self.config.max_queue}); retry later")
            self._waiting.append(request)
            self._live.add(request)
            self._cond.notify()
        return request

    def cancel(self, request: ServeRequest) -> None:
        """Free the request's slot at the next step boundary (a client went away)."""
        if not request.finished:
            request.cancelled = True
            with self._cond:
                self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            rows = [(r.cached, r.remaining) for r in self._rows]
            filling = self._filling.done if self._filling is not None else 0
            return {"active": len(self._rows) + (self._filling is not None), "queued": len(self._waiting),
                    "prefilling": int(self._filling is not None), "live_requests": len(self._live),
                    "kv_state": self._state is not None or self._filling is not None,
                    "kv_slots": len(rows) * max((c for c, _ in rows), default=0) + filling,
                    "max_batch": self.config.max_batch, "kv_budget_tokens": self.config.kv_budget_tokens,
                    "prefill_chunk": self.config.prefill_chunk, **self.counts}

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="qwen2lib-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, then fail whatever is still waiting or running."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._fail_all("the server is shutting down")

    # ---- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        threads, previous = getattr(self.backend, "sampling_threads", None), torch.get_num_threads()
        if threads:  # see OnnxBackend.sampling_threads: onnxruntime's pool and torch's must not fight
            torch.set_num_threads(threads)
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._rows and self._filling is None:
                        self._cond.wait()
                    if self._stopping:
                        return
                try:
                    self._step()
                except Exception as exc:  # a backend failure fails the requests in flight, not the server
                    self._fail_all(f"{type(exc).__name__}: {exc}".splitlines()[0])
        finally:
            torch.set_num_threads(previous)

    @torch.no_grad()
    def _step(self) -> None:
        self._retire()
        self._prefill_step()
        if not self._rows:
            return
        self.counts["peak_batch"] = max(self.counts["peak_batch"], len(self._rows))
        feed = torch.tensor([[r.output[-1]] for r in self._rows])  # (B, 1)
        logits, self._state = self.backend.decode(feed, self._state)
        now = time.perf_counter()
        events = [(row, self._record(row, token, now)) for row, token in zip(self._rows, self._sample(self._rows, logits))]
        self._retire()  # before the events go out: a client told "finished" finds its row already gone
        self._emit(events)

    def _prefill_step(self) -> None:
        """Feed this step's ``prefill_chunk`` prompt tokens: first to the request being prefilled, then to waiting
        requests admitted in turn, while the batch and the KV budget have room for them."""
        budget = self.config.prefill_chunk
        while budget > 0:
            if self._filling is None and not self._admit(budget):
                return
            budget -= self._feed(budget)

    def _admit(self, budget: int) -> bool:
        """Take the head of the queue into prefill if the batch and the KV budget allow it; whether one was taken."""
        if len(self._rows) >= self.config.max_batch:
            return False
        with self._cond:
            while self._waiting and self._waiting[0].cancelled:
                self._finish(self._waiting.popleft(), "cancelled")
            if not self._waiting:
                return False
            head = self._waiting[0]
            prompt = len(head.prompt_ids)
            # running rows keep decoding until the head's last chunk: one step for every chunk after this step's
            joins_after = -(-max(prompt - budget, 0) // self.config.prefill_chunk) if self._chunked else 0
            rows = [(r.cached, r.remaining) for r in self._rows] + [(prompt, head.params.max_new_tokens, joins_after)]
            if peak_kv_slots(rows) > self.config.kv_budget_tokens:
                return False  # first come, first served: the head waits for rows to finish
            self._waiting.popleft()
            self._filling = _Prefilling(head)
        return True

    def _feed(self, budget: int) -> int:
        """Prefill the next chunk (at most ``budget`` tokens) of the request being prefilled; the tokens it took.

        After its last chunk the request's first token goes out and it joins the batch."""
        filling, request = self._filling, self._filling.request
        if request.cancelled:  # its client went away mid-prompt: drop its cache now, not after the whole prompt
            with self._cond:
                self._filling = None
            self._finish(request, "cancelled")
            return 0
        end = min(filling.done + budget, len(request.prompt_ids)) if self._chunked else len(request.prompt_ids)
        ids = torch.tensor([request.prompt_ids[filling.done:end]])
        try:
            if filling.state is None:
                logits, state = self.backend.prefill(ids, torch.ones_like(ids))
            else:
                logits, state = self.backend.extend(ids, filling.state)
        except Exception as exc:  # this request's failure (e.g. a position limit) leaves the batch alone
            with self._cond:
                self._filling = None
            self._fail(request, f"{type(exc).__name__}: {exc}".splitlines()[0])
            return end - filling.done
        with self._cond:
            filling.state, taken, filling.done = state, end - filling.done, end
            if end == len(request.prompt_ids):
                self._filling = None
        if end == len(request.prompt_ids):
            self._join(request, logits, state)
        return taken

    def _join(self, request: ServeRequest, logits: torch.Tensor, state) -> None:
        """A fully prefilled request: sample and send its first token, then splice its cache into the batch."""
        if request.params.repetition_penalty != 1.0:
            request.seen = torch.zeros(logits.shape, dtype=torch.bool)
            request.seen[0, request.prompt_ids] = True
        self._send(request, self._record(request, int(self._sample([request], logits)[0]), time.perf_counter()))
        if not request.finished:  # the first token went out before the splice: the copy is not on its TTFT
            with self._cond:
                self._state = state if self._state is None else self.backend.join_states(self._state, state)
                self._rows.append(request)

    def _sample(self, rows: list[ServeRequest], logits: torch.Tensor) -> list[int]:
        """One token per row, each with its own parameters and generator (so a row's draws do not depend on the batch)."""
        plain = [i for i, r in enumerate(rows) if r.params.greedy and r.params.repetition_penalty == 1.0]
        tokens = [0] * len(rows)
        if plain:
            # numpy's argmax, not torch's: over (B, 151936) float32 logits it is several times faster, and both
            # return the first maximum, so a row's tokens match what ``generate`` picks alone
            scores = logits.detach().cpu().numpy()
            best = (scores if len(plain) == len(rows) else scores[plain]).argmax(-1)
            for i, token in zip(plain, best.tolist()):
                tokens[i] = token
        for i, r in enumerate(rows):
            if i not in plain:
                tokens[i] = int(next_tokens(logits[i:i + 1], r.params, r.generator, r.seen)[0])
                if r.seen is not None:
                    r.seen[0, tokens[i]] = True
        return tokens

    def _record(self, request: ServeRequest, token: int, now: float) -> Event:
        """Add a sampled token to the request and decide whether it finished; the event to send."""
        request.output.append(token)
        self.counts["tokens"] += 1
        if token in self.stop_ids and not request.params.ignore_eos:
            request.finish_reason = "stop"
        elif request.remaining <= 0:
            request.finish_reason = "length"
        if request.finished:
            self.counts["completed"] += 1
        return Event(token=token, time=now, finish_reason=request.finish_reason)

    def _retire(self) -> None:
        """Cut finished and cancelled rows out of the batch state."""
        with self._cond:
            keep = [i for i, r in enumerate(self._rows) if not r.finished and not r.cancelled]
            if len(keep) == len(self._rows):
                return
            for r in self._rows:
                if r.cancelled and not r.finished:
                    self._finish(r, "cancelled")
            self._state = self.backend.select_rows(self._state, keep) if keep else None
            self._rows = [self._rows[i] for i in keep]

    def _finish(self, request: ServeRequest, reason: str) -> None:
        request.finish_reason = reason
        self.counts["cancelled" if reason == "cancelled" else "completed"] += 1
        self._send(request, Event(time=time.perf_counter(), finish_reason=reason))

    def _fail(self, request: ServeRequest, message: str) -> None:
        request.finish_reason = "error"
        self.counts["failed"] += 1
        self._send(request, Event(time=time.perf_counter(), finish_reason="error", error=message))

    def _fail_all(self, message: str) -> None:
        with self._cond:
            filling = [self._filling.request] if self._filling is not None else []
            pending = [r for r in [*self._rows, *filling, *self._waiting] if not r.finished]
            self._rows, self._state, self._filling = [], None, None
            self._waiting.clear()
        for r in pending:
            self._fail(r, message)

    def _send(self, request: ServeRequest, event: Event) -> None:
        self._emit([(request, event)])

    def _emit(self, events: list[tuple[ServeRequest, Event]]) -> None:
        for request, event in events:
            try:
                request.on_event(event)
            except Exception:  # noqa: BLE001 - a gone client's callback must not stop the engine
                pass
        if self.on_burst is not None:
            try:
                self.on_burst()
            except Exception:  # noqa: BLE001 - nor a closed event loop
                pass

