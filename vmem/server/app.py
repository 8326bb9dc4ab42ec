"""`vmem serve`: an OpenAI-compatible HTTP server over the reference engine.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming when
``"stream": true``, ending with ``data: [DONE]``; ``stream_options.include_usage`` adds a usage
chunk), ``GET /v1/models``, ``GET|HEAD /health``, ``GET /metrics`` (Prometheus text).

One engine thread (``EngineLoop``) steps the engine; each request owns an ``asyncio.Queue`` that
the thread fills through ``loop.call_soon_threadsafe``. A request body is read under a size cap
(413) and a deadline (408), then parsed, validated and tokenized on a worker thread, so a large
prompt never stalls the event loop. Limits (prompt tokens, ``max_tokens``, queued requests) answer
400 / 429 with OpenAI's error JSON. A client that goes away, streaming or not, has its request
aborted at once, which frees its KV slot. ``build_server`` adds what uvicorn lacks: a deadline
for each request's headers, and a shutdown that ends every request still running after the grace
period with 503 ``shutting_down`` (streams: an error event, then ``[DONE]``).
The command line (``vmem serve``) is parsed in vmem/cli.py and run by ``serve(args)``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import secrets
import signal
import sys
import threading
import time
from typing import Any

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
except ModuleNotFoundError as exc:   # an optional dependency; vmem/cli.py turns this into one line
    raise ModuleNotFoundError("vmem serve needs FastAPI and uvicorn: pip install 'vmem[server]' (%s)" % exc,
                              name=exc.name) from exc

from vmem.engine.engine import Request as EngineRequest, SamplingParams
from vmem.server.protocol import (
    ApiError, ChatCompletionRequest, CompletionRequest, ResponseShaper, TextStream,
    describe_validation_errors, error_body, new_id, usage,
)
from vmem.server.loop import EngineLoop, ServerMetrics, ShuttingDown
from vmem.errors import VmemError, VmemInvalidArgument

logger = logging.getLogger(__name__)

_DISCONNECTED = object()   # queue item: the client went away


class _ClientGone(Exception):
    """Raised out of _Flight.next() once the client has disconnected."""


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Per-request and queue limits; ``None`` means the engine's own bound (max_seq_len).
    Every limit must be positive: none of them can be set so that the server refuses everything."""
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None     # largest max_tokens a request may ask for
    max_queued: int = 512             # requests waiting to run; more answer 429
    default_max_tokens: int = 16      # /v1/completions default, as OpenAI
    max_body_bytes: int | None = None  # larger bodies answer 413, before they are read; None: body_bytes_for()
    body_timeout_s: float = 30.0      # a body still arriving after this answers 408

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_tokens", "max_queued", "default_max_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if value is None and name in ("max_prompt_tokens", "max_tokens", "max_body_bytes"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise VmemInvalidArgument("ServerLimits.%s must be an integer >= 1, got %r" % (name, value))
        t = self.body_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise VmemInvalidArgument("ServerLimits.body_timeout_s must be a positive number of seconds, got %r" % (t,))


BODY_BYTES_PER_TOKEN = 32   # a token id as JSON is <= 8 bytes, a \uXXXX-escaped character 6, text ~4 per token


def body_bytes_for(max_seq_len: int) -> int:
    """The default body cap: room for a prompt of max_seq_len tokens in any JSON spelling, at least 1 MiB."""
    return max(1 << 20, BODY_BYTES_PER_TOKEN * max_seq_len)


class ServerState:
    """What the handlers share: the engine loop, tokenizer, limits and metrics."""

    def __init__(self, engine, model_name: str, limits: ServerLimits):
        self.engine = engine
        self.model_name = model_name
        self.limits = limits
        self.tokenizer = engine.tokenizer
        self.max_seq_len = int(engine.max_seq_len)   # the cache's, or the model's max_position if smaller
        self.vocab_size = int(engine.model.config.vocab_size)
        self.max_body_bytes = (body_bytes_for(self.max_seq_len) if limits.max_body_bytes is None
                               else limits.max_body_bytes)
        self.engine_loop: EngineLoop | None = None   # made on the event loop, at startup
        self.metrics = ServerMetrics()
        self.created = int(time.time())
        self.shutting_down = False                   # set by build_server's shutdown
        # Parsing and tokenizing run here, off the event loop; two threads bound the memory they hold.
        self.prepare_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="vmem-prepare")

    def prepare(self, raw: bytes, schema: type, request_id: str):
        """Parse and validate a request body, then build the engine Request: ``(body, request, stop)``.
        Runs on a worker thread; raises ApiError."""
        try:
            obj = json.loads(raw)
        except ValueError as exc:   # JSONDecodeError, or bytes that are not UTF-8/16/32
            raise ApiError(400, "request body is not valid JSON: %s" % exc) from None
        try:
            body = schema.model_validate(obj)
        except ValidationError as exc:
            message, param = describe_validation_errors(list(exc.errors()))
            raise ApiError(400, message, param=param) from None
        try:
            engine_request, stop = self.make_request(body, request_id)
        except VmemInvalidArgument as exc:   # e.g. the tokenizer refused the input
            raise ApiError(400, str(exc)) from None
        return body, engine_request, stop

    # -- request admission -----------------------------------------------------------------------
    def prompt_ids(self, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
        if isinstance(body, ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            ids = self.tokenizer.apply_chat_template(messages)
            if isinstance(ids, str):
                ids = self.tokenizer.encode(ids)
            return list(ids)
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(400, "prompt token id %d is outside the vocabulary [0, %d)"
                           % (bad[0], self.vocab_size), param="prompt")
        return list(prompt)

    def make_request(self, body, request_id: str):
        """Validate ``body`` against the limits and build the engine Request (raises ApiError)."""
        if body.model != self.model_name:
            raise ApiError(404, "model %r does not exist; this server serves %r"
                           % (body.model, self.model_name), code="model_not_found", param="model")
        body.check_supported()
        stop = body.stop_strings()
        ids = self.prompt_ids(body)
        num_prompt = len(ids)
        if num_prompt == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        max_prompt = self.max_seq_len - 1
        if self.limits.max_prompt_tokens is not None:
            max_prompt = min(self.limits.max_prompt_tokens, max_prompt)
        if num_prompt > max_prompt:
            raise ApiError(400, "the prompt has %d tokens; this server accepts at most %d"
                           % (num_prompt, max_prompt), code="prompt_too_long", param="prompt")
        max_tokens = self._max_tokens(body, num_prompt)
        if self.shutting_down:
            raise ApiError(503, "server is shutting down", type="server_error", code="shutting_down")
        if not self.engine_loop.alive:
            raise ApiError(503, "the engine is down: %r" % (self.engine_loop.error,), type="server_error",
                           code="engine_down")
        if self.engine_loop.num_queued >= self.limits.max_queued:
            raise ApiError(429, "server busy: %d requests already queued (limit %d); retry later"
                           % (self.engine_loop.num_queued, self.limits.max_queued),
                           type="rate_limit_error", code="queue_full")
        params = SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature if body.temperature is not None else 1.0,
            top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed, stop=stop or None,
            ignore_eos=body.ignore_eos)
        return EngineRequest(request_id=request_id, prompt_ids=ids, params=params), stop

    def _max_tokens(self, body, num_prompt: int) -> int:
        """The request's max_tokens, defaulted and checked against the limits and the room left."""
        room = self.max_seq_len - num_prompt
        cap = room if self.limits.max_tokens is None else min(self.limits.max_tokens, room)
        if isinstance(body, ChatCompletionRequest):
            max_tokens = body.requested_max_tokens()
            param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
            default = cap                          # chat: as much as fits
        else:
            max_tokens, param = body.max_tokens, "max_tokens"
            default = min(self.limits.default_max_tokens, cap)
        if max_tokens is None:
            return default
        if max_tokens < 1:
            raise ApiError(400, "'%s' must be at least 1, got %d" % (param, max_tokens), param=param)
        if max_tokens > cap:
            why = ("the prompt (%d tokens) plus %s must fit in %d tokens" % (num_prompt, param, self.max_seq_len)
                   if cap == room else "this server allows at most %d" % cap)
            raise ApiError(400, "'%s' is %d; %s" % (param, max_tokens, why), param=param,
                           code="max_tokens_too_large")
        return max_tokens


class _Flight:
    """One request in flight: its queue, text stream and timing, on the asyncio side."""

    def __init__(self, state: ServerState, request, stop: list[str]):
        self.state = state
        self.request = request
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(state.tokenizer.decode, stop)
        self.t_start = time.monotonic()
        self.t_first: float | None = None
        self.num_prompt_tokens = len(request.prompt_ids)
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.done = False
        state.engine_loop.submit(request, self.queue.put_nowait)   # runs on this event loop (EngineLoop.post)

    async def next(self) -> tuple[str, str | None]:
        """The next text delta and finish reason (None while running); raises ApiError."""
        item = await self.queue.get()
        if item is _DISCONNECTED:
            raise _ClientGone()
        if isinstance(item, BaseException):
            self.finish("error")
            raise _engine_error(item)
        if item.finished and item.finish_reason == "error":   # the engine found it can never fit
            self.finish("error")
            p = self.request.params
            raise ApiError(400, "the request (%d prompt tokens + max_tokens %d) does not fit in this "
                           "server's KV cache memory" % (self.num_prompt_tokens, p.max_tokens),
                           code="request_too_large")
        if self.t_first is None and item.new_token_ids:
            self.t_first = time.monotonic()
        self.num_output_tokens = item.num_output_tokens
        self.num_cached_tokens = item.num_cached_tokens
        delta, stopped = self.text.push(list(item.new_token_ids), item.finished)
        if stopped and not item.finished:
            self.state.engine_loop.abort(self.request.request_id)   # our stop string, the engine's slot
            self.finish("stop")
            return delta, "stop"
        if item.finished:
            reason = "stop" if stopped else (item.finish_reason or "stop")
            self.finish(reason)
            return delta, reason
        return delta, None

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        if reason == "abort":
            self.state.engine_loop.abort(self.request.request_id)
        ttft = None if self.t_first is None else self.t_first - self.t_start
        self.state.metrics.on_finish(reason, self.num_prompt_tokens, self.num_output_tokens, ttft,
                                     time.monotonic() - self.t_start)

    @property
    def usage(self) -> dict:
        return usage(self.num_prompt_tokens, self.num_output_tokens, self.num_cached_tokens)


def _engine_error(exc: BaseException) -> ApiError:
    if isinstance(exc, VmemInvalidArgument):
        return ApiError(400, str(exc), code="invalid_request")
    if isinstance(exc, ShuttingDown):
        return ApiError(503, str(exc), type="server_error", code="shutting_down")
    return ApiError(500, "engine failure: %s: %s" % (type(exc).__name__, exc), type="server_error",
                    code="engine_error")


async def _watch_disconnect(request: Request, flight: _Flight) -> None:
    """Abort ``flight`` the moment its client closes the connection (streaming or not)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            if not flight.done:
                logger.debug("client of %s went away", flight.request.request_id)
                flight.finish("abort")
                flight.queue.put_nowait(_DISCONNECTED)
            return


def _sse(obj: Any) -> str:
    return "data: %s\n\n" % json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def _read_body(request: Request, cap: int, timeout_s: float) -> bytes:
    """The request body, at most ``cap`` bytes (413 otherwise, said from the Content-Length before
    a byte of the body is read), within ``timeout_s`` (408)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > cap:
        raise ApiError(413, "the request body is %s bytes; this server accepts at most %d" % (declared.strip(), cap),
                       code="body_too_large")
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:   # chunked, or more than it declared
                raise ApiError(413, "the request body is over %d bytes, the most this server accepts" % cap,
                               code="body_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, "the request body took longer than %g s to arrive" % timeout_s,
                       code="body_timeout") from None
    return b"".join(chunks)


async def _generate(state: ServerState, request: Request, schema: type, chat: bool):
    request_id = new_id("chatcmpl" if chat else "cmpl")
    try:
        raw = await _read_body(request, state.max_body_bytes, state.limits.body_timeout_s)
        body, engine_request, stop = await asyncio.get_running_loop().run_in_executor(
            state.prepare_pool, state.prepare, raw, schema, request_id)
    except ClientDisconnect:
        return Response(status_code=499)   # gone before its body arrived; nobody reads this
    except ApiError as err:
        state.metrics.on_reject(err.status_code)
        raise
    flight = _Flight(state, engine_request, stop)
    shaper = ResponseShaper(chat, request_id, state.model_name)
    watcher = asyncio.create_task(_watch_disconnect(request, flight))
    if body.stream:
        return StreamingResponse(_stream(flight, shaper, body.include_usage, watcher, body.continuous_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        parts, reason = [], None
        while reason is None:
            delta, reason = await flight.next()
            parts.append(delta)
    except _ClientGone:
        return Response(status_code=499)   # nobody reads it
    finally:
        flight.finish("abort")   # no-op if it finished
        watcher.cancel()
    return JSONResponse(shaper.full("".join(parts), reason, flight.usage))


async def _stream(flight: _Flight, shaper: ResponseShaper, include_usage: bool, watcher: asyncio.Task,
                  continuous_usage: bool = False):
    """SSE events: one chunk per text delta, a final chunk with finish_reason, usage, [DONE].
    ``continuous_usage``: every chunk also carries the usage so far (vLLM's continuous_usage_stats).

    A client that disconnects is caught by ``watcher`` (which aborts the request) and by
    Starlette, which cancels this generator.
    """
    def so_far():
        return flight.usage if continuous_usage else None

    try:
        if shaper.chat:   # OpenAI's first chat chunk carries the role
            yield _sse(shaper.chunk("", first=True, usage_=so_far()))
        reason = None
        while reason is None:
            try:
                delta, reason = await flight.next()
            except ApiError as err:
                yield _sse(err.body())
                break
            if delta or reason is not None:
                yield _sse(shaper.chunk(delta, reason, usage_=so_far()))
        if include_usage and reason is not None:
            yield _sse(shaper.usage_chunk(flight.usage))
        yield "data: [DONE]\n\n"
    except _ClientGone:
        return
    finally:
        flight.finish("abort")   # no-op if it finished
        watcher.cancel()


# ---------------------------------------------------------------------------------------------

class _ApiKeyAuth:
    """ASGI middleware: every path but /health and /metrics needs ``Authorization: Bearer <key>``
    (as vLLM's ``--api-key``); otherwise 401 with OpenAI's error JSON. Keys are compared as
    SHA-256 digests in constant time."""

    PUBLIC_PATHS = ("/health", "/metrics")

    def __init__(self, app, api_key: str, on_reject=None):
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest()
        self._on_reject = on_reject

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and secrets.compare_digest(
                    hashlib.sha256(token.strip().encode("latin-1")).digest(), self._digest)
        return False

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["method"] != "OPTIONS"
                and scope["path"] not in self.PUBLIC_PATHS and not self._authorized(scope)):
            if self._on_reject is not None:
                self._on_reject(401)
            body = error_body("missing or wrong API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
            await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(engine, *, model_name: str = "tiny", limits: ServerLimits | None = None,
               api_key: str | None = None) -> FastAPI:
    """The FastAPI app over ``engine``; the engine thread runs for the app's lifespan.
    ``api_key``: require it as a Bearer token on every path but /health and /metrics."""
    state = ServerState(engine, model_name, limits or ServerLimits())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine_loop = EngineLoop(engine, post=asyncio.get_running_loop().call_soon_threadsafe)
        state.engine_loop.start()
        logger.info("engine thread started: model %s, cache %s", model_name,
                    getattr(engine.cache, "kind", "?"))
        try:
            yield
        finally:
            state.prepare_pool.shutdown(wait=False, cancel_futures=True)
            if state.engine_loop.stop():
                logger.info("engine thread stopped")
            else:
                logger.warning("engine thread still inside a step after 10 s; the engine stays open")

    app = FastAPI(title="vmem", lifespan=lifespan)
    app.state.vmem = state
    if api_key is not None:
        if not api_key:
            raise VmemInvalidArgument("api_key must not be empty")
        app.add_middleware(_ApiKeyAuth, api_key=api_key, on_reject=state.metrics.on_reject)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        state.metrics.on_reject(400)
        message, param = describe_validation_errors(list(err.errors()))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        return JSONResponse(error_body(str(err.detail), code=str(err.status_code)),
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        logger.exception("unhandled error")
        return JSONResponse(error_body("internal error: %s" % type(err).__name__, type="server_error"),
                            status_code=500)

    # The bodies are read and parsed by _generate (size cap, deadline, off the event loop);
    # openapi_extra keeps their schemas in /docs.
    def body_doc(schema) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": schema.model_json_schema()}}}}

    @app.post("/v1/completions", openapi_extra=body_doc(CompletionRequest))
    async def completions(request: Request):
        return await _generate(state, request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=body_doc(ChatCompletionRequest))
    async def chat_completions(request: Request):
        return await _generate(state, request, ChatCompletionRequest, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": state.created, "owned_by": "vmem",
            "max_model_len": state.max_seq_len}]}

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if not state.engine_loop.alive:
            return JSONResponse({"status": "engine down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.engine_loop),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


# ---------------------------------------------------------------------------------------------
# The HTTP server: uvicorn, plus a header deadline and a shutdown that answers every request

SHUTDOWN_MARGIN_S = 5.0   # after the grace period, time for the 503s to be written before uvicorn cancels


def _header_deadline_protocol(timeout_s: float) -> type:
    """uvicorn's HTTP protocol, closing a connection that has not sent a whole request head within
    ``timeout_s`` of opening or of its last response (uvicorn itself waits forever: slowloris)."""

    class HeaderDeadlineProtocol(AutoHTTPProtocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc):
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout_s, self._header_timeout)

        def _header_timeout(self):
            self._header_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                return   # its head arrived: a request is running (its body has its own deadline)
            if not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                                     b"connection: close\r\n\r\n")
                self.transport.close()

    return HeaderDeadlineProtocol


class _Server(uvicorn.Server):
    """uvicorn's server; on shutdown, once ``grace_s`` has passed, the engine loop stops, so each
    request still running gets 503 ``shutting_down`` (a stream: an error event, then [DONE])
    before uvicorn would cancel it (a plain-text 500, or a stream cut short)."""

    def __init__(self, config, state: ServerState, grace_s: float):
        super().__init__(config)
        self._state = state
        self._grace_s = grace_s
        self._stopping: asyncio.Future | None = None

    async def shutdown(self, sockets=None):
        self._state.shutting_down = True
        timer = asyncio.get_running_loop().call_later(self._grace_s, self._end_requests)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _end_requests(self) -> None:
        engine_loop = self._state.engine_loop
        if engine_loop is not None and engine_loop.thread_alive:
            logger.info("grace period of %g s over: ending the requests still running with 503", self._grace_s)
            self._stopping = asyncio.ensure_future(asyncio.to_thread(engine_loop.stop))


def build_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                 header_timeout_s: float = 10.0, max_connections: int = 1024,
                 shutdown_timeout_s: float = 10.0) -> uvicorn.Server:
    """A uvicorn server for ``app`` (from create_app): ``run()`` it, or set ``should_exit``."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            http=_header_deadline_protocol(header_timeout_s), limit_concurrency=max_connections,
                            timeout_graceful_shutdown=shutdown_timeout_s + SHUTDOWN_MARGIN_S)
    return _Server(config, app.state.vmem, shutdown_timeout_s)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _kv_budget(args) -> dict:
    """build_engine arguments for --kv-budget: the shared budget (created with --memory when absent)."""
    from vmem.allocator import BudgetPolicy
    from vmem.backends import Budget
    if args.cache != "vmem":
        raise VmemInvalidArgument("--kv-budget needs --cache vmem")
    budget = Budget(args.kv_budget, args.memory)
    if args.memory is not None and budget.limit_bytes != args.memory:
        logger.warning("KV budget %s exists with limit %d bytes; --memory %d is not applied",
                       budget.path, budget.limit_bytes, args.memory)
    return {"memory_bytes": None, "budget": budget,
            "budget_policy": BudgetPolicy(min_bytes=args.kv_budget_min or 0)}


def serve(args) -> int:
    """Run ``vmem serve`` for arguments parsed by vmem/cli.py; returns the exit status."""
    from vmem.engine.engine import build_engine

    logging.basicConfig(level=logging.DEBUG if args.log_level == "trace" else args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not _is_loopback(args.host) and args.api_key is None:
        print("vmem serve: warning: listening on %s without authentication: anyone who can reach this port "
              "can use the server (set --api-key or VMEM_API_KEY)" % args.host, file=sys.stderr)
    if args.torch_threads is not None:
        import torch
        torch.set_num_threads(args.torch_threads)
    kwargs = {"memory_bytes": args.memory, "max_batch": args.max_batch, "backend": args.backend,
              "seed": args.seed, "dtype": args.dtype, "prefix_caching": args.enable_prefix_caching}
    if args.max_seq_len is not None:
        kwargs["max_seq_len"] = args.max_seq_len
    try:
        if args.kv_budget is not None:
            kwargs.update(_kv_budget(args))
        engine = build_engine(model=args.model, cache_kind=args.cache, **kwargs)
    except VmemError as exc:
        print("vmem serve: %s" % exc, file=sys.stderr)
        return 2
    limits = ServerLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                          max_queued=args.max_queued, max_body_bytes=args.max_body_bytes,
                          body_timeout_s=args.body_timeout)
    app = create_app(engine, model_name=args.served_model_name or args.model, limits=limits,
                     api_key=args.api_key)
    server = build_server(app, host=args.host, port=args.port, log_level=args.log_level,
                          header_timeout_s=args.header_timeout, max_connections=args.max_connections,
                          shutdown_timeout_s=args.shutdown_timeout)
    try:
        _run_until_signal(server)
    finally:
        loop = app.state.vmem.engine_loop
        if loop is None or not loop.thread_alive:   # never close the cache under a step still running
            engine.close()
    return 0


def _run_until_signal(server: uvicorn.Server) -> None:
    """server.run(); a SIGINT/SIGTERM shuts it down gracefully and returns. (uvicorn raises the
    signal again once it has shut down, for embedders; here that would kill the process before
    the engine is closed, so the signals are ignored outside uvicorn's own handler.)"""
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
