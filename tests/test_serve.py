"""Continuous batching (rows join and leave a running batch) and the OpenAI-compatible server on loopback."""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import Qwen2ForCausalLM

from conftest import tiny_hf_config
from qwen2lib.generation import SamplingParams, TorchBackend, generate
from qwen2lib.serving import Engine, EngineConfig, Event, ServeRequest, peak_kv_slots

PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 61], [9, 8, 7], [100, 200, 300, 44, 55], [12] * 11, [77, 78]]
TIMEOUT = 120  # seconds; generous, a busy machine must not fail a test


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(tiny_hf_config(initializer_range=0.2)).eval()


class Collector:
    """Runs requests through an engine; ``then`` submits the next job once a request has emitted k tokens."""

    def __init__(self, engine):
        self.engine, self.done, self.requests = engine, threading.Semaphore(0), []

    def submit(self, prompt, params, then=None):
        def on_event(event: Event, state={"n": 0}):
            if event.token is not None:
                state["n"] += 1
                if then is not None and state["n"] == then[0]:
                    self.submit(*then[1:])
            if event.finish_reason is not None:
                self.done.release()

        request = ServeRequest(list(prompt), params, on_event)
        self.requests.append(request)
        return self.engine.submit(request)

    def wait(self, n):
        for _ in range(n):
            assert self.done.acquire(timeout=TIMEOUT), "a request never finished"


def test_peak_kv_slots_counts_padding_and_rows_leaving():
    assert peak_kv_slots([(10, 5)]) == 15
    # two rows: at step 2 both alive, longest 10 + 2 -> 24; at step 8 only the short one, 3 + 8 = 11
    assert peak_kv_slots([(10, 2), (3, 8)]) == 24
    assert peak_kv_slots([(10, 1), (3, 20)]) == 23  # 2 x 11 at step 1, then the long row alone


def test_requests_joining_mid_decode_get_the_tokens_they_get_alone(hf_model):
    backend = TorchBackend(hf_model)
    lengths = [12, 9, 15, 6, 10]
    params = [SamplingParams(max_new_tokens=n) for n in lengths]
    alone = [generate(backend, None, p, q, stop_ids=set()).token_ids for p, q in zip(PROMPTS, params)]
    engine = Engine(backend, stop_ids=set(), config=EngineConfig(max_batch=3)).start()
    try:
        jobs = Collector(engine)
        # each request joins when the previous one has 2..4 tokens, so rows of different lengths share a batch,
        # the batch fills (max 3 rows: later ones queue), and rows leave at different steps
        chain = None
        for i in reversed(range(1, len(PROMPTS))):
            chain = (2 + i % 3, PROMPTS[i], params[i], chain)
        jobs.submit(PROMPTS[0], params[0], then=chain)
        jobs.wait(len(PROMPTS))
        served = {tuple(r.prompt_ids): r.output for r in jobs.requests}
        assert [served[tuple(p)] for p in PROMPTS] == alone
        assert all(r.finish_reason == "length" for r in jobs.requests)
        stats = engine.stats()
        assert stats["active"] == stats["queued"] == 0 and not stats["kv_state"]
        assert stats["completed"] == len(PROMPTS) and stats["tokens"] == sum(lengths)
    finally:
        engine.stop()


def test_sampled_rows_draw_from_their_own_seeded_generator(hf_model):
    backend = TorchBackend(hf_model)
    sampled = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7, repetition_penalty=1.2)
    engine = Engine(backend, stop_ids=set(), config=EngineConfig(max_batch=4)).start()
    try:
        alone = Collector(engine)
        alone.submit(PROMPTS[0], sampled)
        alone.wait(1)
        crowd = Collector(engine)
        crowd.submit(PROMPTS[1], SamplingParams(max_new_tokens=12), then=(1, PROMPTS[0], sampled, None))
        crowd.wait(2)
        assert crowd.requests[1].output == alone.requests[0].output
    finally:
        engine.stop()


def test_kv_budget_queues_requests_and_refuses_one_that_never_fits(hf_model):
    from qwen2lib.serving import RequestTooLargeError

    engine = Engine(TorchBackend(hf_model), stop_ids=set(), config=EngineConfig(max_batch=8, kv_budget_tokens=40))
    with pytest.raises(RequestTooLargeError, match="KV budget of 40"):
        engine.submit(ServeRequest([1] * 30, SamplingParams(max_new_tokens=20), lambda e: None))
    peaks = []
    engine.start()
    try:
        jobs = Collector(engine)
        original = engine.backend.decode

        def watched(ids, state):
            peaks.append(ids.shape[0] * (state[1].shape[1] + 1))
            return original(ids, state)

        engine.backend.decode = watched
        for p in PROMPTS[:4]:
            jobs.submit(p, SamplingParams(max_new_tokens=10))
        jobs.wait(4)
        assert max(peaks) <= 40 and len(peaks) > 0
        assert all(len(r.output) == 10 for r in jobs.requests)
    finally:
        engine.stop()
