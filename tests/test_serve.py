"""Continuous batching (rows join and leave a running batch) and the OpenAI-compatible server on loopback."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from transformers import Qwen2ForCausalLM

from conftest import tiny_hf_config
from qwen2lib.errors import Qwen2LibError
from qwen2lib.serve.generation import SamplingParams, TorchBackend, generate
from qwen2lib.serve.engine import Engine, EngineConfig, Event, ServeRequest, peak_kv_slots

PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 61], [9, 8, 7], [100, 200, 300, 44, 55], [12] * 11, [77, 78]]
TIMEOUT = 120  # seconds; generous, a busy machine must not fail a test


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared machine: one intra-op thread beats several spinning threads fighting for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def submit_joining_chain(jobs, params) -> list[list[int]]:
    """Each prompt joins when the previous one has 2..4 tokens; returns every prompt's output, in PROMPTS order."""
    chain = None
    for i in reversed(range(1, len(PROMPTS))):
        chain = (2 + i % 3, PROMPTS[i], params[i], chain)
    jobs.submit(PROMPTS[0], params[0], then=chain)
    jobs.wait(len(PROMPTS))
    served = {tuple(r.prompt_ids): r.output for r in jobs.requests}
    return [served[tuple(p)] for p in PROMPTS]


def test_peak_kv_slots_counts_padding_and_rows_leaving():
    assert peak_kv_slots([(10, 5)]) == 15
    # two rows: at step 2 both alive, longest 10 + 2 -> 24; at step 8 only the short one, 3 + 8 = 11
    assert peak_kv_slots([(10, 2), (3, 8)]) == 24
    assert peak_kv_slots([(10, 1), (3, 20)]) == 23  # 2 x 11 at step 1, then the long row alone
    # a prompt joining after 3 steps counts at its whole length from now and lives 3 steps longer:
    # at step 5 both rows, 2 x (20 + 2); at step 8 the joined row alone, 20 + 5
    assert peak_kv_slots([(10, 5), (20, 5, 3)]) == 44
    assert peak_kv_slots([(20, 5, 3)]) == 25  # alone: its prompt and outputs, as if it joined at once


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
        assert submit_joining_chain(jobs, params) == alone
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


@pytest.mark.parametrize("chunk", [256, 2])  # prompts whole, or in chunks over several steps
def test_kv_budget_queues_requests_and_refuses_one_that_never_fits(hf_model, chunk):
    from qwen2lib.serve.engine import RequestTooLargeError

    engine = Engine(TorchBackend(hf_model), stop_ids=set(),
                    config=EngineConfig(max_batch=8, kv_budget_tokens=40, prefill_chunk=chunk))
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


def test_a_step_is_one_burst_of_events_for_every_row(hf_model):
    """The consumer hook runs once per prefill and once per decode step, after that step's events for all rows."""
    backend, log, decodes = TorchBackend(hf_model), [], []
    original = backend.decode

    def counted(ids, state):
        decodes.append(ids.shape[0])
        return original(ids, state)

    backend.decode = counted
    engine = Engine(backend, stop_ids=set(), config=EngineConfig(max_batch=3), on_burst=lambda: log.append("burst"))
    jobs = Collector(engine)
    for prompt in PROMPTS[:3]:  # all three wait before the engine starts: they are admitted together
        jobs.submit(prompt, SamplingParams(max_new_tokens=6))
    for r in jobs.requests:
        r.on_event = lambda event, inner=r.on_event: (log.append("event"), inner(event))
    engine.start()
    try:
        jobs.wait(3)
    finally:
        engine.stop()
    assert log.count("burst") == 3 + len(decodes) and max(decodes) == 3  # 3 prefills, then one burst a step
    bursts = "".join("e" if x == "event" else "|" for x in log).split("|")[:-1]
    assert [len(b) for b in bursts] == [1, 1, 1] + decodes  # each burst carries one event per row decoded


def traced(backend, log: list) -> None:
    """Log every backend call as (method, tokens per row or rows): the order of chunks and decode steps."""
    for name in ("prefill", "extend", "decode"):
        def call(ids, *rest, original=getattr(backend, name), name=name):
            log.append((name, ids.shape[0] if name == "decode" else ids.shape[1]))
            return original(ids, *rest)

        setattr(backend, name, call)


def test_a_prompt_prefilled_in_chunks_continues_its_own_cache_to_the_same_logits_and_tokens(hf_model):
    backend = TorchBackend(hf_model)
    ids = torch.tensor([PROMPTS[3] + PROMPTS[0]])  # 19 tokens
    whole, _ = backend.prefill(ids, torch.ones_like(ids))
    logits, state = backend.prefill(ids[:, :5], torch.ones_like(ids[:, :5]))
    for start in range(5, 19, 5):
        logits, state = backend.extend(ids[:, start:start + 5], state)
    torch.testing.assert_close(logits, whole, rtol=1e-4, atol=1e-5)
    assert state[1].shape == (1, 19) and backend.decode(torch.tensor([[3]]), state)[0].shape == whole.shape
    # the engine: every prompt in chunks of 2 (the last one shorter), rows joining mid-decode as before
    lengths = [12, 9, 15, 6, 10]
    params = [SamplingParams(max_new_tokens=n) for n in lengths]
    alone = [generate(backend, None, p, q, stop_ids=set()).token_ids for p, q in zip(PROMPTS, params)]
    engine = Engine(backend, stop_ids=set(), config=EngineConfig(max_batch=3, prefill_chunk=2)).start()
    try:
        assert submit_joining_chain(Collector(engine), params) == alone
        assert engine.stats()["prefilling"] == 0 and not engine.stats()["kv_state"]
    finally:
        engine.stop()


def test_running_rows_get_a_token_between_the_chunks_of_a_long_prompt(hf_model):
    """No step waits for a whole prompt: each runs one chunk of the newcomer, then a decode step for the running row."""
    backend, log = TorchBackend(hf_model), []
    traced(backend, log)
    long_prompt = [(7 * i) % 300 + 1 for i in range(40)]
    engine = Engine(backend, stop_ids=set(), config=EngineConfig(max_batch=2, prefill_chunk=4))
    done = threading.Event()
    newcomer = ServeRequest(long_prompt, SamplingParams(max_new_tokens=3),
                            lambda e: (log.append(("newcomer", e.token)), e.finish_reason and done.set()))

    def on_running(event):  # the newcomer arrives once the running row has streamed two tokens
        log.append(("running", event.token))
        if len(running.output) == 2 and event.token is not None:
            engine.submit(newcomer)

    running = ServeRequest(PROMPTS[1], SamplingParams(max_new_tokens=30), on_running)
    engine.submit(running)
    engine.start()
    try:
        assert done.wait(TIMEOUT)
    finally:
        engine.stop()
    first = log.index(("prefill", 4))  # the newcomer's first chunk (the running row's prompt has 3 tokens)
    last = max(i for i, call in enumerate(log) if call == ("extend", 4))
    between = log[first:last + 1]
    assert [c for c in between if c[0] in ("prefill", "extend")] == [("prefill", 4)] + [("extend", 4)] * 9
    # after each of the first nine chunks: one decode step of the running row alone and its token
    chunks = [i for i, c in enumerate(between) if c[0] in ("prefill", "extend")]
    for a, b in zip(chunks, chunks[1:]):
        assert [c[0] for c in between[a + 1:b]] == ["decode", "running"] and between[a + 1] == ("decode", 1)
    assert not any(c[0] == "newcomer" for c in log[:last])  # its first token only after its last chunk
    assert log[last + 1][0] == "newcomer" and log[last + 2] == ("decode", 2)  # then it joins the batch
    assert newcomer.output == generate(TorchBackend(hf_model), None, long_prompt, SamplingParams(max_new_tokens=3),
                                       stop_ids=set()).token_ids


def test_a_request_cancelled_mid_prefill_frees_its_row_and_kv_budget_at_the_next_chunk(hf_model):
    backend, log = TorchBackend(hf_model), []
    traced(backend, log)
    # one row and a budget for one of the two: the second request can only start once the first is gone
    engine = Engine(backend, stop_ids=set(), config=EngineConfig(max_batch=1, kv_budget_tokens=60, prefill_chunk=4))
    jobs = Collector(engine)
    long_request = jobs.submit([(5 * i) % 300 + 1 for i in range(40)], SamplingParams(max_new_tokens=10))
    jobs.submit(PROMPTS[0], SamplingParams(max_new_tokens=10))
    extend = backend.extend

    def cancelled_in_its_second_chunk(ids, state):
        engine.cancel(long_request)
        return extend(ids, state)

    backend.extend = cancelled_in_its_second_chunk
    engine.start()
    try:
        jobs.wait(2)
        stats = engine.stats()
    finally:
        engine.stop()
    assert long_request.finish_reason == "cancelled" and long_request.output == []
    assert log[:3] == [("prefill", 4), ("extend", 4), ("prefill", 4)]  # no chunk after the cancellation
    assert len(jobs.requests[1].output) == 10 and jobs.requests[1].finish_reason == "length"
    assert stats["active"] == stats["prefilling"] == stats["kv_slots"] == 0 and not stats["kv_state"]
    assert stats["cancelled"] == 1 and stats["completed"] == 1


def test_the_event_relay_wakes_the_loop_once_for_everything_posted_since_the_last_wake_up():
    from qwen2lib.serve.server import EventRelay

    loop, wakeups = asyncio.new_event_loop(), []
    schedule = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *args: (wakeups.append(args), schedule(*args))
    relay, a, b = EventRelay(), asyncio.Queue(), asyncio.Queue()
    relay.bind(loop)
    try:
        for queue, token in ((a, 1), (b, 2), (a, 3)):
            relay.post(queue, Event(token=token))
        relay.wake()
        relay.wake()  # already scheduled: nothing more to do
        assert len(wakeups) == 1 and a.empty()  # nothing is delivered before the loop runs
        loop.run_until_complete(asyncio.sleep(0))
        assert [a.get_nowait().token, a.get_nowait().token, b.get_nowait().token] == [1, 3, 2]
        relay.wake()  # nothing pending: no wake-up
        relay.post(b, Event(token=4))
        relay.wake()
        loop.run_until_complete(asyncio.sleep(0))
        assert len(wakeups) == 2 and b.get_nowait().token == 4
    finally:
        loop.close()


# ---- the HTTP server on loopback --------------------------------------------------------------

import gc  # noqa: E402
import json  # noqa: E402

import aiohttp  # noqa: E402

from qwen2lib.serve.server import ServerThread, build_app, rss_mb  # noqa: E402


@pytest.fixture(scope="module")
def tiny_random():
    from qwen2lib import load_tokenizer
    from qwen2lib.pipeline import load_backend

    return load_backend("tiny-random", "torch"), load_tokenizer("tiny-random")


def serve(tiny_random, **config):
    backend, tokenizer = tiny_random
    return ServerThread(build_app(backend, tokenizer, "tiny-random", EngineConfig(**config)))


@pytest.fixture(scope="module")
def server(tiny_random):
    with serve(tiny_random, max_batch=8, kv_budget_tokens=8192, max_queue=256) as url:
        yield url


def call(coro_fn, *args):
    return asyncio.run(asyncio.wait_for(coro_fn(*args), TIMEOUT))


async def post(url, path, body, raw: bytes | None = None):
    """(status, parsed JSON body, or for a stream the list of parsed ``data:`` payloads)."""
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, data=raw, json=None if raw is not None else body) as response:
            if response.content_type == "text/event-stream":
                events = [line[5:].strip().decode() async for line in response.content if line.startswith(b"data:")]
                return response.status, [e if e == "[DONE]" else json.loads(e) for e in events]
            return response.status, await response.json()


async def get(url, path):
    async with aiohttp.ClientSession() as session:
        async with session.get(url + path) as response:
            return response.status, await response.json()


async def drained(url):
    """The engine's counters once no row is active or queued (a finished row leaves at the step's end)."""
    for _ in range(int(TIMEOUT / 0.02)):
        stats = (await get(url, "/health"))[1]
        if stats["active"] == stats["queued"] == 0:
            return stats
        await asyncio.sleep(0.02)
    return stats


def test_models_and_a_completion_with_usage(server, tiny_random):
    _, tokenizer = tiny_random
    status, models = call(get, server, "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny-random"]
    status, body = call(post, server, "/v1/completions", {"model": "tiny-random", "prompt": "def add(a, b):",
                                                          "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert status == 200 and body["object"] == "text_completion", body
    assert body["usage"] == {"prompt_tokens": len(tokenizer.encode("def add(a, b):")), "completion_tokens": 6,
                             "total_tokens": len(tokenizer.encode("def add(a, b):")) + 6}
    assert body["choices"][0]["finish_reason"] == "length" and isinstance(body["choices"][0]["text"], str)


def test_streamed_completion_equals_the_unstreamed_one_and_ends_with_usage(server):
    request = {"prompt": "import os\n", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    _, whole = call(post, server, "/v1/completions", request)
    status, events = call(post, server, "/v1/completions", {**request, "stream": True,
                                                            "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 8 + ["length"]  # a chunk per token
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


def test_streamed_chat_is_the_greedy_chat_completion(server, tiny_random):
    backend, tokenizer = tiny_random
    messages = [{"role": "user", "content": "Write a haiku about tests."}]
    expected = generate(backend, tokenizer, messages, SamplingParams(max_new_tokens=10))
    status, events = call(post, server, "/v1/chat/completions", {"messages": messages, "max_tokens": 10,
                                                                 "temperature": 0, "stream": True})
    assert status == 200 and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == expected.text and len(chunks) - 1 == len(expected.token_ids)
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reason


def test_bench_stream_chat_hands_each_token_over_as_it_arrives_and_refuses_in_one_line(server, tiny_random):
    backend, tokenizer = tiny_random
    messages = [{"role": "user", "content": "Write a haiku about tests."}]
    expected = generate(backend, tokenizer, messages, SamplingParams(max_new_tokens=10))
    pieces = []
    answer = stream_chat(server, {"messages": messages, "max_tokens": 10, "temperature": 0,
                                  "stream_options": {"include_usage": True}}, on_text=pieces.append)
    assert answer["text"] == "".join(pieces) == expected.text and len(pieces) == len(expected.token_ids)
    assert answer["usage"]["completion_tokens"] == len(expected.token_ids)
    with pytest.raises(Qwen2LibError, match=r"chat/completions: HTTP 400: .*max_tokens") as refused:
        stream_chat(server, {"messages": messages, "max_tokens": -1})
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", None, None),  # malformed JSON
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, "model"),
    ("/v1/completions", {"prompt": [5] * 5000}, "prompt"),  # over the 4096-token context
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
])
def test_bad_requests_get_a_400_with_an_openai_error_body(server, path, body, param):
    status, answer = call(post, server, path, body, b"{not json" if body is None else None)
    assert status == 400, answer
    assert set(answer["error"]) >= {"message", "type", "param", "code"} and answer["error"]["message"]
    assert answer["error"]["param"] == param and answer["error"]["code"] == 400


def test_a_full_queue_answers_429_and_a_disconnect_frees_the_slot_at_once(tiny_random):
    long = {"prompt": "a", "max_tokens": 4000, "temperature": 0, "ignore_eos": True, "stream": True}

    async def scenario(url):
        async with aiohttp.ClientSession() as session:
            first = await session.post(url + "/v1/completions", json=long)
            assert first.status == 200 and (await first.content.readline()).startswith(b"data:")  # running
            queued = asyncio.create_task(post(url, "/v1/completions", {"prompt": "b", "max_tokens": 2}))
            while (await get(url, "/health"))[1]["queued"] < 1:
                await asyncio.sleep(0.01)
            status, refused = await post(url, "/v1/completions", {"prompt": "c", "max_tokens": 2})
            assert status == 429 and refused["error"]["code"] == 429, refused
            first.close()  # the client goes away mid-stream
            status, answer = await queued
            assert status == 200 and answer["usage"]["completion_tokens"] >= 1
            return await drained(url)

    with serve(tiny_random, max_batch=1, max_queue=1) as url:
        health = call(scenario, url)
    assert health["cancelled"] == 1 and health["completed"] == 1, health  # the long one never ran to 4000
    assert health["active"] == health["queued"] == 0 and not health["kv_state"]


def test_soak_every_request_is_answered_or_refused_and_the_server_drains(tiny_random):
    """~200 mixed requests at once, every 8th cancelled mid-stream: none is lost, nothing is left behind."""
    words = "alpha beta gamma delta epsilon".split()

    def job(i):
        body = {"max_tokens": 1 + i % 6, "temperature": 0 if i % 3 else 0.8, "seed": i, "stream": i % 2 == 0,
                "ignore_eos": i % 5 != 0, "stream_options": {"include_usage": True}}
        text = " ".join(words[j % 5] for j in range(1 + i % 40))
        if i % 4 == 1:
            return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}
        return "/v1/completions", {**body, "prompt": text}

    async def one(session, i):
        path, body = job(i)
        async with session.post(url + path, json=body) as response:
            if response.status != 200:
                return "refused", response.status, (await response.json())["error"]["message"]
            if not body["stream"]:
                answer = await response.json()
                ok = answer["choices"][0]["finish_reason"] in ("stop", "length")
                return "complete" if ok else "broken", answer["usage"]["completion_tokens"], body["max_tokens"]
            events = []
            async for line in response.content:
                if line.startswith(b"data:"):
                    events.append(line[5:].strip().decode())
                    if i % 8 == 0 and len(events) == 1:  # this client hangs up after its first token
                        return "cancelled", 1, body["max_tokens"]
            chunks = [json.loads(e) for e in events[:-1]]
            ok = events[-1] == "[DONE]" and chunks[-1]["usage"]["completion_tokens"] == len(chunks) - 2 \
                and chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
            return "complete" if ok else "broken", chunks[-1]["usage"]["completion_tokens"], body["max_tokens"]

    async def soak(n):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            return await asyncio.gather(*(one(session, i) for i in range(n)))

    with serve(tiny_random, max_batch=8, kv_budget_tokens=1024, max_queue=150) as url:
        call(soak, 16)  # warm-up: first-call allocations are not a leak
        gc.collect()
        baseline = rss_mb()
        outcomes = call(soak, 200)
        stats = call(drained, url)
        gc.collect()
        after = call(get, url, "/health")[1]
    kinds = [o[0] for o in outcomes]
    assert "broken" not in kinds and kinds.count("complete") >= 100, kinds
    assert all(o[1] == 429 for o in outcomes if o[0] == "refused")  # refused only because the queue was full
    assert all(1 <= n <= cap for kind, n, cap in outcomes if kind == "complete")
    assert stats["kv_state"] is False and stats["failed"] == 0 and stats["cancelled"] >= 1
    assert stats["completed"] + stats["cancelled"] == 216 - kinds.count("refused"), stats
    assert after["live_requests"] == 0, "requests still referenced after the load: a leak"
    assert after["rss_mb"] - baseline < 256, (baseline, after["rss_mb"])


# ---- bench --url: the load client -----------------------------------------------------------

from qwen2lib.serve.bench import arrival_delays, benchmark_server, stream_chat, synthetic_requests  # noqa: E402


def test_arrivals_are_poisson_at_the_rate_or_all_at_once():
    assert not arrival_delays(5, float("inf")).any()
    gaps = arrival_delays(4000, request_rate=4.0, seed=1)
    assert gaps[0] == 0 and abs(gaps[1:].mean() - 0.25) < 0.02 and abs(gaps[1:].std() - 0.25) < 0.02  # exponential
    bursty = arrival_delays(4000, request_rate=4.0, burstiness=0.25, seed=1)
    assert abs(bursty[1:].mean() - 0.25) < 0.04 and bursty[1:].std() > 0.4  # same rate, burstier
    assert (arrival_delays(50, 2.0, seed=3) == arrival_delays(50, 2.0, seed=3)).all()
    with pytest.raises(ValueError, match="must be > 0"):
        arrival_delays(3, 0.0)


def test_bench_url_measures_every_token_and_honours_max_concurrency(tiny_random):
    requests = synthetic_requests(12, seed=0, vocab_size=150000, mean_prompt=12, mean_output=6)
    with serve(tiny_random, max_batch=8) as url:
        limited = benchmark_server(url, requests, request_rate=200.0, max_concurrency=2, progress=False)
        peak_limited = call(get, url, "/health")[1]["peak_batch"]
        with pytest.raises(ValueError, match="chat endpoint takes text"):
            benchmark_server(url, requests, chat=True)
        unlimited = benchmark_server(url + "/v1", requests, chat=True, tokenizer=tiny_random[1], progress=False,
                                     label="chat")
        peak = call(get, url, "/health")[1]["peak_batch"]
    for run in (limited, unlimited):
        assert run["completed"] == 12 and run["failed"] == 0, run["errors"]
        assert run["total_output_tokens"] == sum(r.output_len for r in requests)  # ignore_eos: exact lengths
        for r in run["requests"]:
            assert len(r["itl_s"]) == r["output_len"] - 1 and 0 < r["ttft_s"] <= r["e2e_s"]
        assert run["ttft_ms"]["p99"] >= run["ttft_ms"]["median"] > 0 and run["output_throughput"] > 0
    assert limited["model"] == "tiny-random" and limited["total_input_tokens"] == sum(r.prompt_len for r in requests)
    assert unlimited["total_input_tokens"] > limited["total_input_tokens"]  # the chat template's tokens count too
    assert peak_limited <= 2 < peak  # at most 2 in flight; all at once, requests shared decode steps


def test_cli_bench_url_and_serve_reject_bad_arguments_in_one_line(capsys):
    from qwen2lib.cli import main

    for argv in (["serve", "--port", "70000"], ["serve", "--max-batch", "0"], ["serve", "--stage", "fp8 graph"],
                 ["serve", "--prefill-chunk", "0"],
                 ["bench", "--url", "ftp://127.0.0.1:1"], ["bench", "--url", "http://127.0.0.1:1", "--max-concurrency", "0"],
                 ["bench", "--url", "http://127.0.0.1:1", "--request-rate", "0"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"qwen2lib {argv[0]}: error:"), err
        if "--prefill-chunk" in argv:
            assert "--prefill-chunk=0: must be at least 1" in err, err


def test_cli_bench_url_writes_the_run(tiny_random, tmp_path, capsys):
    from qwen2lib.cli import main

    with serve(tiny_random, max_batch=4) as url:
        code = main(["bench", "--model", "tiny-random", "--workdir", str(tmp_path), "--url", url, "--num-requests", "4",
                     "--request-rate", "50", "--label", "ours"])
    assert code == 0
    out = capsys.readouterr().out
    assert "ttft p99 ms" in out and "out tok/s" in out
    run = json.loads((tmp_path / "inference" / "bench-url-ours-synthetic-rate50.json").read_text())
    assert run["completed"] == 4 and run["request_rate"] == 50 and run["failed"] == 0


def test_a_compiled_graph_serves_joining_requests_as_it_generates_them_alone(hf_model, tmp_path):
    """The onnx backend's KVState rows join and leave too (contrib graph: the cache is decoded in place), and a
    prompt prefilled in chunks continues its own cache to the same tokens."""
    from qwen2lib.compile.stage import compile_model
    from qwen2lib.pipeline import load_backend

    hf_model.save_pretrained(tmp_path / "ckpt")
    compiled = compile_model("qwen2_fp32", model=str(tmp_path / "ckpt"), out_dir=tmp_path / "compiled", verbose=False)
    backend = load_backend(str(tmp_path / "ckpt"), "onnx", compiled=compiled)
    params = [SamplingParams(max_new_tokens=n) for n in (12, 9, 15, 6, 10)]
    alone = [generate(backend, None, p, q, stop_ids=set()).token_ids for p, q in zip(PROMPTS, params)]
    for chunk in (256, 2):  # prompts whole, then in chunks of 2 continuing the graph's cache
        engine = Engine(backend, stop_ids=set(), config=EngineConfig(max_batch=3, prefill_chunk=chunk)).start()
        try:
            jobs = Collector(engine)
            assert submit_joining_chain(jobs, params) == alone, chunk
            assert engine.stats()["peak_batch"] == 3
        finally:
            engine.stop()
    ids = torch.tensor([PROMPTS[3] + PROMPTS[0]])
    logits, state = backend.prefill(ids[:, :7], torch.ones_like(ids[:, :7]))
    logits, state = backend.extend(ids[:, 7:], state)
    torch.testing.assert_close(logits, backend.prefill(ids, torch.ones_like(ids))[0], rtol=1e-4, atol=1e-5)


def test_the_load_client_runs_inside_a_running_event_loop_too():
    """Notebook 05 calls it from a Jupyter kernel, whose event loop is already running."""
    import asyncio

    from qwen2lib.serve.bench import run_coroutine

    async def answer():
        return 42

    async def from_a_kernel():
        return run_coroutine(answer())

    assert run_coroutine(answer()) == 42
    assert asyncio.run(from_a_kernel()) == 42
