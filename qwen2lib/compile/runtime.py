"""Run a compiled Qwen2 graph (notebook 04's folder) in onnxruntime, with an explicit KV cache.

    lm = OnnxCausalLM.load("runs/tiny/compiled/qwen2_int8")   # manifest.json + model.onnx
    logits, state = lm.prefill(ids)            # ids (B, T) int64 [, attention_mask (B, T), 0 = left pad]
    logits, state = lm.decode(next_ids, state) # next_ids (B, 1); logits (B, 1, V) float32 numpy
    lm(ids)                                    # torch (B, T, V) float32: the ids -> logits callable
                                               # of the fidelity report (stepwise for last-position graphs)

``state`` is a ``KVState``: per layer (key, value) numpy buffers (B, n_kv, C >= P, hd) in the graph's KV
dtype (``state.past``: the filled (B, n_kv, P, hd) part), plus the attention mask (B, P) so far. Contrib
graphs decode into those buffers in place. ``run()`` is the raw call with the conventional names, for
callers that keep their own cache. Positions come from the mask (count of real tokens before each
token), so left-padded batches need no position bookkeeping. Attributes worth knowing:
``max_positions`` (the graph's rotary table size), ``insert_slice``, ``kv_dtype``, ``manifest``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .manifest import GraphManifest
from ..errors import MissingInputError, NumericalOverflowError, PromptTooLongError, Qwen2LibError
from ..model.threads import workbook_threads
from ..scratch.masks import positions_from_mask

_ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# prompt tokens per graph call in prefill (OnnxCausalLM.prefill_chunk; 0: the whole prompt). GroupQueryAttention
# scores a call's queries against every key, masked ones included, so cost grows with the call's square: pieces of
# 256 prefilled 512-2048-token prompts fastest (benchmarks/README.md, "Long context")
PREFILL_CHUNK = 256


class GraphLoadError(Qwen2LibError, RuntimeError):
    """A graph file onnxruntime cannot open (truncated, corrupt, or not ONNX)."""


@dataclass
class KVState:
    """The cache after P tokens: per layer (key, value) buffers (B, n_kv, C, hd) whose first P positions hold it.

    A contrib graph decodes into the buffers in place (C > P: GroupQueryAttention's shared past/present
    buffers), so a step copies no cache; ``past`` is the (B, n_kv, P, hd) view of what is filled. The
    state a decode returns shares those buffers: to branch (two continuations of one prefix), decode
    from ``KVState([(k.copy(), v.copy()) for k, v in state.past], state.attention_mask.copy())``.
    """
    buffers: list[tuple[np.ndarray, np.ndarray]]  # per layer (B, n_kv, C, hd), C >= P
    attention_mask: np.ndarray  # (B, P) int64
    bound: "_CacheBinding | None" = field(default=None, repr=False)  # ``buffers`` bound to a session, once per allocation

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    @property
    def capacity(self) -> int:
        return self.buffers[0][0].shape[2]

    @property
    def past(self) -> list[tuple[np.ndarray, np.ndarray]]:
        P = self.length
        return [(k[:, :, :P], v[:, :, :P]) for k, v in self.buffers]


def join_kv(a: KVState, b: KVState) -> KVState:
    """The rows of ``a`` then ``b`` in one state, the shorter left-padded (mask 0) to the longer's length.

    The serving engine splices a newly prefilled request into its running batch this way; the copy drops
    the in-place buffers' spare capacity, so the next contrib decode re-allocates and re-binds once.
    """
    n = max(a.length, b.length)
    buffers = []
    for (ka, va), (kb, vb) in zip(a.past, b.past):
        pair = []
        for x, y in ((ka, kb), (va, vb)):
            out = np.zeros((x.shape[0] + y.shape[0], x.shape[1], n, x.shape[3]), x.dtype)
            out[:x.shape[0], :, n - x.shape[2]:] = x
            out[x.shape[0]:, :, n - y.shape[2]:] = y
            pair.append(out)
        buffers.append(tuple(pair))
    mask = np.zeros((a.attention_mask.shape[0] + b.attention_mask.shape[0], n), np.int64)
    mask[:a.attention_mask.shape[0], n - a.length:] = a.attention_mask
    mask[a.attention_mask.shape[0]:, n - b.length:] = b.attention_mask
    return KVState(buffers, mask)


def select_kv(state: KVState, rows: list[int]) -> KVState:
    """Only ``rows`` of ``state``, without the left padding none of them needs any more (a copy)."""
    mask = state.attention_mask[rows]
    first = int(np.argmax(mask.any(axis=0)))  # the earliest position some kept row uses
    buffers = [(np.ascontiguousarray(k[rows, :, first:]), np.ascontiguousarray(v[rows, :, first:]))
               for k, v in state.past]
    return KVState(buffers, np.ascontiguousarray(mask[:, first:]))


def session_options(threads: int | None = None, optimization_level: str = "all", spinning: bool = True):
    """``spinning=False``: worker threads sleep between parallel sections instead of busy-waiting for the next,
    which leaves the cores to other threads of the process (a server's event loop) or of the machine."""
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[optimization_level])
    # no count given: the workbook's (the free cores, or $QWEN2LIB_THREADS), not onnxruntime's one per core, whose
    # pool waits at every barrier for a thread another process has descheduled
    options.intra_op_num_threads = int(threads or workbook_threads())
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxCausalLM:
    """One onnxruntime session over a graph with the decoder I/O convention."""

    def __init__(self, session, manifest: GraphManifest | None = None):
        self.session = session
        self.manifest = manifest or GraphManifest()
        inputs = {i.name: i for i in session.get_inputs()}
        self.input_names = set(inputs)
        self.output_names = [o.name for o in session.get_outputs()]
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        first = inputs["past_key_values.0.key"]
        self.num_kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.kv_dtype = _NP[first.type]
        logits_shape = session.get_outputs()[0].shape
        self.vocab_size = int(logits_shape[-1])
        self.insert_slice = logits_shape[1] == 1
        self.max_positions = int(self.manifest.max_sequence_length)
        self.operator_set = self.manifest.operator_set
        # GroupQueryAttention graphs share past/present buffers; a Dual Chunk Attention graph concatenates
        self.group_query_attention = self.operator_set == "contrib" and not self.manifest.dual_chunk_attention
        self.prefill_chunk = PREFILL_CHUNK

    @classmethod
    def load(cls, folder: str | os.PathLike, threads: int | None = None, optimization_level: str | None = None,
             manifest: GraphManifest | None = None, spinning: bool = True):
        """A compiled folder (manifest.json + model.onnx) or a bare .onnx file.

        ``manifest`` stands in for the folder's manifest.json (the compiler verifies before writing one).
        """
        folder = Path(folder)
        graph = folder
        if folder.is_dir():
            manifest = manifest or GraphManifest.read(folder)
            graph = folder / manifest.graph_file
        elif not folder.is_file():
            raise MissingInputError(f"{folder} does not exist: compile a graph first (`qwen2lib compile CONFIG`)")
        if manifest is None:  # a bare graph: its opsets and node names (not its weights) tell what it runs
            manifest = GraphManifest.for_bare_graph(onnx.load(str(graph), load_external_data=False))
        threads = threads if threads is not None else (manifest.runtime.get("threads") or None)
        level = optimization_level or manifest.runtime.get("optimization_level", "all")
        try:
            session = ort.InferenceSession(str(graph), session_options(threads, level, spinning), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own error types (InvalidProtobuf, Fail, NoSuchFile ...)
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise GraphLoadError(f"{graph} cannot be loaded by onnxruntime ({reason}): it is damaged or not a "
                                 "compiled graph; compile it again (`qwen2lib compile CONFIG`)") from None
        return cls(session, manifest)

    # ---- the raw call -------------------------------------------------------------------------
    def _check_positions(self, position_ids: np.ndarray) -> None:
        if position_ids.size and int(position_ids.max()) >= self.max_positions:
            raise PromptTooLongError(f"position {int(position_ids.max())} is past this graph's limit of "
                                     f"{self.max_positions} positions (graph.max_sequence_length); recompile with a "
                                     "larger one or shorten the prompt")

    def empty_past(self, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), self.kv_dtype)  # (B, n_kv, 0, hd)
        return [(empty, empty)] * self.num_layers

    def run(self, input_ids, attention_mask=None, position_ids=None, past=None):
        """One graph call: ids (B, T), mask (B, P + T), positions (B, T), past per layer (B, n_kv, P, hd).

        Returns (logits (B, T or 1, V) float32, present per layer (B, n_kv, P + T, hd)).
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        B, T = ids.shape
        past = past if past is not None else self.empty_past(B)
        P = past[0][0].shape[2]
        mask = np.ones((B, P + T), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if position_ids is None:
            position_ids = positions_from_mask(mask)[:, P:]
        position_ids = np.asarray(position_ids, np.int64)
        self._check_positions(position_ids)
        if self.group_query_attention and B > 1 and T > 1 and P > 0:
            # GroupQueryAttention continues a prompt over a cache for one row at a time; rows are independent.
            rows = [self.run(ids[b:b + 1], mask[b:b + 1], position_ids[b:b + 1], [(k[b:b + 1], v[b:b + 1]) for k, v in past])
                    for b in range(B)]
            logits = np.concatenate([r[0] for r in rows])
            present = [tuple(np.concatenate([r[1][i][j] for r in rows]) for j in range(2)) for i in range(self.num_layers)]
            return logits, present
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"] = np.ascontiguousarray(k)  # a view of a larger buffer is copied
            feed[f"past_key_values.{i}.value"] = np.ascontiguousarray(v)
        out = dict(zip(self.output_names, self.session.run(None, feed)))
        present = [(out[f"present.{i}.key"], out[f"present.{i}.value"]) for i in range(self.num_layers)]
        return out["logits"], present

    # ---- generation-style calls ---------------------------------------------------------------
    def prefill(self, input_ids, attention_mask=None, chunk: int | None = None) -> tuple[np.ndarray, KVState]:
        """The prompt through the graph, ``chunk`` tokens per call (default ``self.prefill_chunk``; 0: all at once).

        A long prompt runs in pieces through the cache, as llama.cpp runs one in micro-batches: the attention's
        scratch ((B, H, chunk, P + chunk) scores per layer) then grows with the chunk, not with the prompt's
        square (8k tokens at once at Qwen2-0.5B's shape: 3.7 GB of GroupQueryAttention scores, several times
        that for a Dual Chunk Attention graph, and onnxruntime's arena keeps it). Left-padded batches run whole:
        a row's first chunk could be all padding.
        """
        ids = np.asarray(input_ids, np.int64)
        mask = np.ones(ids.shape, np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        chunk = self.prefill_chunk if chunk is None else int(chunk)
        if not chunk or ids.shape[1] <= chunk or not mask.all():
            logits, present = self.run(ids, mask)
            return logits, KVState(present, mask)
        present, pieces = None, []
        for start in range(0, ids.shape[1], chunk):
            end = min(start + chunk, ids.shape[1])
            logits, present = self.run(ids[:, start:end], mask[:, :end], past=present)
            pieces.append(logits)
        return (logits if self.insert_slice else np.concatenate(pieces, axis=1)), KVState(present, mask)

    def decode(self, next_ids, state: KVState, in_place: bool = True) -> tuple[np.ndarray, KVState]:
        """One token per row. Contrib graphs write the cache into ``state``'s buffers (``in_place``); otherwise
        the cache goes in and a fresh concatenated copy comes back, as with any graph of this I/O convention."""
        ids = np.asarray(next_ids, np.int64).reshape(-1, 1)
        mask = np.concatenate([state.attention_mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
        if not self.group_query_attention or not in_place:
            logits, present = self.run(ids, mask, past=state.past)
            return logits, KVState(present, mask)
        return self._decode_in_place(ids, mask, state)

    def _decode_in_place(self, ids: np.ndarray, mask: np.ndarray, state: KVState) -> tuple[np.ndarray, KVState]:
        """One step that writes the new key/value into the state's buffers (past and present bound to the same
        memory, as onnxruntime-genai runs GroupQueryAttention), growing them when full."""
        P = state.length
        position_ids = positions_from_mask(mask)[:, P:]
        self._check_positions(position_ids)
        if state.capacity <= P or state.bound is None or state.bound.session is not self.session:
            capacity = max(state.capacity, P + max(128, P))  # room to grow without a copy per step
            if state.capacity <= P:
                buffers = []
                for k, v in state.buffers:
                    grown = [np.zeros(k.shape[:2] + (capacity,) + k.shape[3:], k.dtype) for _ in range(2)]
                    grown[0][:, :, :P], grown[1][:, :, :P] = k[:, :, :P], v[:, :, :P]
                    buffers.append(tuple(grown))
            else:
                buffers = state.buffers
            state = KVState(buffers, state.attention_mask, _CacheBinding(self.session, buffers))
        logits = np.empty((ids.shape[0], 1, self.vocab_size), np.float32)  # fresh: callers may keep the last one
        state.bound.run(ids, mask, position_ids, logits)
        return logits, KVState(state.buffers, mask, state.bound)

    def __call__(self, input_ids):
        """ids (B, T) -> torch float32 logits (B, T, V) for every position.

        A last-position graph is walked one token at a time through its cache instead.
        """
        ids = np.asarray(input_ids.cpu() if hasattr(input_ids, "cpu") else input_ids, np.int64)
        if not self.insert_slice:
            logits, _ = self.run(ids)
        else:
            steps, state = [], None
            for t in range(ids.shape[1]):
                if state is None:
                    out, state = self.prefill(ids[:, :1])
                else:
                    out, state = self.decode(ids[:, t:t + 1], state)
                steps.append(out[:, -1:])
            logits = np.concatenate(steps, axis=1)
        return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))


class _CacheBinding:
    """An IOBinding of one session with every layer's past and present bound to the same cache buffers, made
    once per allocation: a decode step then binds only the ids, mask, positions and a logits buffer."""

    def __init__(self, session, buffers: list[tuple[np.ndarray, np.ndarray]]):
        self.session = session
        self.values = [tuple(ort.OrtValue.ortvalue_from_numpy(t) for t in pair) for pair in buffers]  # kept alive
        self.binding = session.io_binding()
        for i, (k, v) in enumerate(self.values):
            self.binding.bind_ortvalue_input(f"past_key_values.{i}.key", k)
            self.binding.bind_ortvalue_input(f"past_key_values.{i}.value", v)
            self.binding.bind_ortvalue_output(f"present.{i}.key", k)
            self.binding.bind_ortvalue_output(f"present.{i}.value", v)

    def run(self, ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray, logits: np.ndarray) -> None:
        """One step: the cache grows in place, ``logits`` (B, 1, V) float32 is written."""
        self.binding.bind_cpu_input("input_ids", ids)
        self.binding.bind_cpu_input("attention_mask", mask)
        self.binding.bind_cpu_input("position_ids", position_ids)
        self.binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(self.binding)


def check_finite(logits: np.ndarray, present=None, what: str = "graph") -> None:
    """Raise NumericalOverflowError naming the first output with inf/NaN (garbage is never returned silently)."""
    if not np.isfinite(logits).all():
        bad = np.argwhere(~np.isfinite(logits))[0].tolist()
        raise NumericalOverflowError(f"{what}: logits hold inf/NaN (first at index {bad}); an activation "
                                     "overflowed its dtype")
    for i, (k, v) in enumerate(present or []):
        for name, t in (("key", k), ("value", v)):
            if not np.isfinite(t).all():
                raise NumericalOverflowError(f"{what}: present.{i}.{name} (the KV cache of layer {i}) holds inf/NaN; "
                                             f"layer {i}'s {name} projection overflowed {t.dtype}")
