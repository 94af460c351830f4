"""OpenAI-compatible HTTP server over the continuous-batching engine: ``qwen2lib serve``.

Web stack: aiohttp, because one small package is both this server and the load client of ``bench --url``.

    GET  /v1/models             the one served model
    POST /v1/completions        {"prompt": text or token ids, "max_tokens", "temperature", "top_p", "stream", ...}
    POST /v1/chat/completions   {"messages": [...], ...}; the tokenizer's chat template makes the prompt
    GET  /health                the engine's counters (rows, queue, KV slots, live requests, RSS)

Streaming answers are server-sent events, one chunk per generated token, a last chunk with the finish
reason, then a ``usage`` chunk when ``stream_options.include_usage`` is set, then ``data: [DONE]``. Beyond
OpenAI's fields, ``top_k``, ``repetition_penalty`` and ``ignore_eos`` are accepted as vLLM does. Bad
requests get 400 with an OpenAI-style ``{"error": {...}}`` body; a full queue gets 429. A client that
disconnects has its handler cancelled (aiohttp ``handler_cancellation``), which frees its row at the
engine's next step boundary.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

from aiohttp import web

from ..errors import PromptTooLongError
from ..stages.resident import resident_bytes
from .generation import SamplingParams, TextStream, encode_prompt, stop_token_ids
from .engine import Engine, EngineConfig, Event, QueueFullError, RequestTooLargeError, ServeRequest

LOOPBACK = "127.0.0.1"
ENGINE_KEY = web.AppKey("engine", Engine)
CONFIG_KEY = web.AppKey("serve_config", dict)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


def error_response(message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status)


# ---- request parsing --------------------------------------------------------------------------

def _number(body: dict, name: str, default, kind=float, low=None, high=None, low_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise BadRequest(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    value = kind(value)
    if low is not None and (value <= low if low_open else value < low) or high is not None and value > high:
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise BadRequest(f"{name}={value} is out of range {bounds}", name)
    return value


def parse_request(body, chat: bool, tokenizer, model_name: str, max_positions: int) -> tuple[list[int], SamplingParams, dict]:
    """(prompt ids, sampling parameters, options) of a completions or chat body; BadRequest says what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("model") not in (None, model_name):
        raise BadRequest(f"model {body['model']!r} is not served here; this server serves {model_name!r} (GET /v1/models)",
                         "model", kind="model_not_found")
    if _number(body, "n", 1, int, 1) != 1:
        raise BadRequest("n > 1 is not supported: send one request per completion", "n")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages):
            raise BadRequest('messages must be a non-empty list of {"role": ..., "content": "text"}', "messages")
        try:
            ids = encode_prompt(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])
        except Exception as exc:  # the template refuses a role order, or there is no template
            raise BadRequest(f"could not apply the chat template: {exc}".splitlines()[0], "messages") from exc
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            ids = encode_prompt(tokenizer, prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            if max(ids) >= len(tokenizer) or min(ids) < 0:
                raise BadRequest(f"prompt token ids must be in [0, {len(tokenizer)})", "prompt")
        else:
            raise BadRequest("prompt must be a non-empty string or list of token ids (one prompt per request)", "prompt")
    if not ids:
        raise BadRequest("the prompt encodes to no tokens", "prompt")
    room = max_positions - len(ids)
    if room < 1:
        raise BadRequest(f"the prompt has {len(ids)} tokens but the model's context is {max_positions}: shorten it",
                         "messages" if chat else "prompt")
    max_tokens = body.get("max_completion_tokens") if chat and body.get("max_tokens") is None else body.get("max_tokens")
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, int, 1)
    if max_tokens is None:
        max_tokens = room if chat else min(16, room)  # OpenAI's defaults: the rest of the context; 16 for completions
    elif max_tokens > room:
        raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) is over the model's context of "
                         f"{max_positions}: lower max_tokens to at most {room}", "max_tokens")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"seed must be an integer, got {seed!r}", "seed")
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0, low_open=True),
        top_k=max(_number(body, "top_k", 0, int, -1), 0),  # vLLM: -1 or 0 is off
        repetition_penalty=_number(body, "repetition_penalty", 1.0, float, 0.0, low_open=True),
        seed=seed, ignore_eos=bool(body.get("ignore_eos", False)))
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("stop must be a string or a list of up to 4 non-empty strings", "stop")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    options = {"stream": bool(body.get("stream", False)), "stop": stop,
               "include_usage": bool(stream_options.get("include_usage", False))}
    return ids, params, options


# ---- one request ------------------------------------------------------------------------------

class Answer:
    """Turns the engine's token events into text, honouring stop strings (which end the request)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.text_stream, self.stop, self.text, self.tokens = TextStream(tokenizer), stop, "", 0

    def push(self, token: int) -> tuple[str, bool]:
        """(text delta, whether a stop string ended the answer)."""
        self.tokens += 1
        delta = self.text_stream.push(token)
        return self._add(delta)

    def flush(self) -> str:
        return self._add(self.text_stream.flush())[0]

    def _add(self, delta: str) -> tuple[str, bool]:
        before = len(self.text)
        self.text += delta
        for s in self.stop:
            at = self.text.find(s, max(0, before - len(s)))
            if at >= 0:
                self.text = self.text[:at]
                return self.text[before:] if at > before else "", True
        return delta, False


def _chunk(kind: str, rid: str, model: str, created: int, delta: str | None, finish: str | None, first: bool) -> dict:
    if kind == "chat":
        message = {"content": delta} if delta is not None else {}
        if first:
            message["role"] = "assistant"
        choice = {"index": 0, "delta": message, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


async def _sse(response: web.StreamResponse, payload) -> None:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    await response.write(f"data: {data}\n\n".encode())


async def handle_completion(request: web.Request, chat: bool) -> web.StreamResponse:
    engine, config = request.app[ENGINE_KEY], request.app[CONFIG_KEY]
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return error_response(f"the request body is not valid JSON: {exc}")
    try:
        ids, params, options = parse_request(body, chat, config["tokenizer"], config["model"], engine.backend.max_positions)
    except BadRequest as exc:
        return error_response(str(exc), exc.status, exc.param, exc.kind)
    except ValueError as exc:  # SamplingParams' own checks
        return error_response(str(exc).splitlines()[0])
    events, relay = asyncio.Queue(), config["relay"]
    job = ServeRequest(ids, params, lambda event: relay.post(events, event))
    try:
        engine.submit(job)
    except QueueFullError as exc:
        return error_response(str(exc), 429, kind="rate_limit_exceeded")
    except (PromptTooLongError, RequestTooLargeError, ValueError) as exc:
        return error_response(str(exc).splitlines()[0], param="max_tokens")
    try:
        meta = ("chat" if chat else "text", f"{'chatcmpl' if chat else 'cmpl'}-{job.id}", config["model"], int(time.time()))
        if options["stream"]:
            return await _stream(request, job, events, options, config["tokenizer"], meta)
        return await _complete(job, events, options, config["tokenizer"], meta)
    except ConnectionResetError:  # the client hung up between two chunks: nobody is left to answer
        return web.Response(status=499)
    finally:
        engine.cancel(job)  # no-op when it finished; frees the row at once when the client went away


async def _stream(request, job, events, options, tokenizer, meta) -> web.StreamResponse:
    kind, rid, model, created = meta
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    answer, first, finish = Answer(tokenizer, options["stop"]), True, None
    while finish is None:
        event: Event = await events.get()
        if event.error is not None:
            await _sse(response, {"error": {"message": event.error, "type": "server_error", "param": None, "code": 500}})
            break
        if event.token is not None:  # one chunk per token, even when its text is held back or empty
            delta, stopped = answer.push(event.token)
            await _sse(response, _chunk(kind, rid, model, created, delta, None, first))
            first = False
        else:
            stopped = False
        finish = "stop" if stopped else event.finish_reason
        if finish is not None:  # then a bare terminator, as OpenAI ends a stream
            await _sse(response, _chunk(kind, rid, model, created, "" if stopped else answer.flush(), finish, first))
    if options["include_usage"]:
        usage = _usage(job, answer)
        await _sse(response, {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                              "created": created, "model": model, "choices": [], "usage": usage})
    await _sse(response, "[DONE]")
    await response.write_eof()
    return response


async def _complete(job, events, options, tokenizer, meta) -> web.Response:
    kind, rid, model, created = meta
    answer, finish, stopped = Answer(tokenizer, options["stop"]), None, False
    while finish is None:
        event: Event = await events.get()
        if event.error is not None:
            return error_response(event.error, 500, kind="server_error")
        stopped = answer.push(event.token)[1] if event.token is not None else False
        finish = "stop" if stopped else event.finish_reason
    if not stopped:
        answer.flush()
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": answer.text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": answer.text, "logprobs": None, "finish_reason": finish}
    return web.json_response({"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                              "created": created, "model": model, "choices": [choice], "usage": _usage(job, answer)})


def _usage(job: ServeRequest, answer: Answer) -> dict:
    n = answer.tokens
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n, "total_tokens": len(job.prompt_ids) + n}


# ---- the app ----------------------------------------------------------------------------------

class EventRelay:
    """Hands the engine thread's events to the handlers' queues on the event loop, one wake-up per burst.

    The engine emits a token for every row at the end of each step. Waking the loop once per event costs a
    self-pipe write and a GIL hand-over per token, so ``post`` only queues and the engine's ``on_burst`` hook
    (``wake``) schedules one delivery for everything posted since the last one.
    """

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Event]] = []
        self._scheduled = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        """Called on the engine thread; never blocks on the loop."""
        with self._lock:
            self._pending.append((queue, event))

    def wake(self) -> None:
        """Called on the engine thread after a burst of posts: one wake-up delivers them all."""
        with self._lock:
            if not self._pending or self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is closed: the server is going down
            pass

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for queue, event in pending:
            queue.put_nowait(event)


async def handle_models(request: web.Request) -> web.Response:
    config, engine = request.app[CONFIG_KEY], request.app[ENGINE_KEY]
    card = {"id": config["model"], "object": "model", "created": config["created"], "owned_by": "qwen2lib",
            "max_model_len": engine.backend.max_positions}
    return web.json_response({"object": "list", "data": [card]})


async def handle_health(request: web.Request) -> web.Response:
    stats = request.app[ENGINE_KEY].stats()
    stats["rss_mb"] = rss_mb()
    return web.json_response(stats)


def rss_mb() -> float:
    """Resident memory of this process now, in MiB."""
    return resident_bytes() / 2**20


def build_app(backend, tokenizer, model_name: str, config: EngineConfig | None = None) -> web.Application:
    """The aiohttp application; its engine thread starts and stops with the app."""
    relay = EventRelay()
    engine = Engine(backend, stop_token_ids(tokenizer, getattr(backend, "config", None)), config, on_burst=relay.wake)
    app = web.Application(client_max_size=16 * 2**20)
    app[ENGINE_KEY] = engine
    app[CONFIG_KEY] = {"tokenizer": tokenizer, "model": model_name, "created": int(time.time()), "relay": relay}

    async def completions(request):
        return await handle_completion(request, chat=False)

    async def chat_completions(request):
        return await handle_completion(request, chat=True)

    async def start_engine(_app):
        relay.bind(asyncio.get_running_loop())
        engine.start()

    async def stop_engine(_app):
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app.router.add_get("/v1/models", handle_models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/health", handle_health)
    app.on_startup.append(start_engine)
    app.on_cleanup.append(stop_engine)
    return app


class ServerThread:
    """Serve an app on its own event loop in a background thread (notebooks, tests): ``with ServerThread(app) as url``."""

    def __init__(self, app: web.Application, host: str = LOOPBACK, port: int = 0):
        self.app, self.host, self.port = app, host, port
        self.url: str | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qwen2lib-server", daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=60)
        return self.url

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # the port the OS picked when asked for 0
        self.url = f"http://{self.host}:{port}"

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=60)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
