"""`vmem serve`: an OpenAI-compatible HTTP server over the reference engine.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming when
``"stream": true``, ending with ``data: [DONE]``; ``stream_options.include_usage`` adds a usage
chunk), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

One engine thread (``EngineLoop``) steps the engine; each request owns an ``asyncio.Queue`` that
the thread fills through ``loop.call_soon_threadsafe``. Limits (prompt tokens, ``max_tokens``,
queued requests) answer 400 / 429 with OpenAI's error JSON; malformed bodies answer 400. A client
that goes away, streaming or not, has its request aborted at once, which frees its KV slot.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import sys
import time
from typing import Any

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:   # an optional dependency
    raise ImportError("vmem serve needs FastAPI and uvicorn: pip install 'vmem[server]' (%s)" % exc) from exc

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
    """Per-request and queue limits; ``None`` means the engine's own bound (max_seq_len)."""
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None     # largest max_tokens a request may ask for
    max_queued: int = 512             # requests waiting to run; more answer 429
    default_max_tokens: int = 16      # /v1/completions default, as OpenAI


class ServerState:
    """What the handlers share: the engine loop, tokenizer, limits and metrics."""

    def __init__(self, engine, model_name: str, limits: ServerLimits):
        self.engine = engine
        self.model_name = model_name
        self.limits = limits
        self.tokenizer = engine.tokenizer
        self.max_seq_len = int(engine.max_seq_len)   # the cache's, or the model's max_position if smaller
        self.vocab_size = int(engine.model.config.vocab_size)
        self.engine_loop: EngineLoop | None = None   # made on the event loop, at startup
        self.metrics = ServerMetrics()
        self.created = int(time.time())

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
        max_prompt = min(self.limits.max_prompt_tokens or self.max_seq_len, self.max_seq_len - 1)
        if num_prompt > max_prompt:
            raise ApiError(400, "the prompt has %d tokens; this server accepts at most %d"
                           % (num_prompt, max_prompt), code="prompt_too_long", param="prompt")
        max_tokens = self._max_tokens(body, num_prompt)
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
        cap = min(self.limits.max_tokens or self.max_seq_len, room)
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
        return usage(self.num_prompt_tokens, self.num_output_tokens)


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


async def _generate(state: ServerState, request: Request, body, chat: bool):
    request_id = new_id("chatcmpl" if chat else "cmpl")
    try:
        engine_request, stop = state.make_request(body, request_id)
    except VmemInvalidArgument as exc:   # e.g. the tokenizer refused the input
        state.metrics.on_reject(400)
        raise ApiError(400, str(exc)) from None
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

def create_app(engine, *, model_name: str = "tiny", limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app over ``engine``; the engine thread runs for the app's lifespan."""
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
            if state.engine_loop.stop():
                logger.info("engine thread stopped")
            else:
                logger.warning("engine thread still inside a step after 10 s; the engine stays open")

    app = FastAPI(title="vmem", lifespan=lifespan)
    app.state.vmem = state

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

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _generate(state, request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _generate(state, request, body, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": state.created, "owned_by": "vmem",
            "max_model_len": state.max_seq_len}]}

    @app.get("/health")
    async def health():
        if not state.engine_loop.alive:
            return JSONResponse({"status": "engine down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.engine_loop),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmem serve", description="OpenAI-compatible server over the vmem engine")
    p.add_argument("--model", default="tiny",
                   help="a preset (tiny, small, medium; default tiny) or a local Hugging Face checkpoint directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV cache dtype (auto: the checkpoint's; float32 for presets)")
    p.add_argument("--cache", default="vmem", choices=["vmem", "paged", "static"])
    p.add_argument("--memory", type=parse_bytes, default=None,
                   help="physical KV memory, e.g. 256M or 2G (default: every slot at full length)")
    p.add_argument("--kv-budget", default=None, metavar="NAME",
                   help="share one KV budget with other servers: a name (/dev/shm/vmem-kv-NAME) or a path; "
                        "--memory is its total, used when this server creates it (vmem cache only)")
    p.add_argument("--kv-budget-min", type=parse_bytes, default=None, metavar="SIZE",
                   help="with --kv-budget: memory guaranteed to this server (must be free at start)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--backend", default="auto", choices=["auto", "host", "cuda"])
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask")
    p.add_argument("--max-queued", type=int, default=512, help="queued requests before 429")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); 1 suits small models on busy cores")
    p.add_argument("--log-level", default="info")
    return p


def parse_bytes(text: str | None) -> int | None:
    """``"512M"`` -> 536870912; plain integers are bytes."""
    if text is None:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(s)
    except (ValueError, OverflowError):   # OverflowError: int(float("inf"))
        raise argparse.ArgumentTypeError("not a byte size: %r" % text) from None


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vmem serve``."""
    import uvicorn

    from vmem.engine.engine import build_engine

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.torch_threads is not None:
        import torch
        torch.set_num_threads(max(1, args.torch_threads))
    kwargs = {"memory_bytes": args.memory, "max_batch": args.max_batch, "backend": args.backend,
              "seed": args.seed, "dtype": args.dtype}
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
                          max_queued=args.max_queued)
    app = create_app(engine, model_name=args.served_model_name or args.model, limits=limits)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                    timeout_graceful_shutdown=10)
    finally:
        loop = app.state.vmem.engine_loop
        if loop is None or not loop.thread_alive:   # never close the cache under a step still running
            engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
