"""The OpenAI-compatible server, live on loopback, driven by the official `openai` client and httpx.

A real uvicorn server runs in a background thread over a real engine (tiny model, vmem cache on
the host backend). Outputs are checked against the same engine driven directly.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from vmem.engine.engine import Request, SamplingParams, build_engine  # noqa: E402
from vmem.server.app import ServerLimits, build_server, create_app  # noqa: E402
from conftest import wait_for_server  # noqa: E402

MODEL = "tiny"
MAX_SEQ_LEN = 256
ENGINE_KW = dict(model=MODEL, cache_kind="vmem", max_batch=8, max_seq_len=MAX_SEQ_LEN, backend="host")


class StepGate:
    """Holds the engine thread before ``step()`` when told to, so tests need no timing luck.

    Only steps with requests to run count: ``close()`` holds them, ``allow(n)`` lets n more run and
    then holds, ``open()`` runs freely. ``fail_next`` is raised by the next such step (fault injection).
    """

    def __init__(self, engine):
        self._cond = threading.Condition()
        self._budget: int | None = None   # steps still allowed; None = unlimited
        self._num_held = 0                # engine threads waiting at the gate (0 or 1)
        self.fail_next: BaseException | None = None
        inner = engine.step

        def step():
            if not (engine.num_running or engine.num_waiting):
                return inner()   # only hands out finished outputs: not held, not counted
            with self._cond:
                self._num_held += 1
                self._cond.notify_all()
                assert self._cond.wait_for(lambda: self._budget != 0, 30), "gate left closed"
                self._num_held -= 1
                if self._budget is not None:
                    self._budget -= 1
            if self.fail_next is not None:
                exc, self.fail_next = self.fail_next, None
                raise exc
            return inner()
        engine.step = step

    def allow(self, num_steps: int | None) -> None:
        with self._cond:
            self._budget = num_steps
            self._cond.notify_all()

    def close(self):
        self.allow(0)

    def wait_held(self, timeout_s: float = 10.0) -> None:
        """Return once the engine thread waits at the gate."""
        with self._cond:
            assert self._cond.wait_for(lambda: self._num_held > 0, timeout_s), "engine never reached the gate"

    def open(self):
        self.allow(None)


class LiveServer:
    """uvicorn on 127.0.0.1:<free port> in a daemon thread, its engine behind a StepGate."""

    def __init__(self, engine, limits: ServerLimits | None = None, *, api_key: str | None = None, **server_kw):
        self.engine = engine
        self.gate = StepGate(engine)
        self.app = create_app(engine, model_name=MODEL, limits=limits, api_key=api_key)
        self.server = build_server(self.app, host="127.0.0.1", port=0, log_level="warning",
                                   **{"shutdown_timeout_s": 5, **server_kw})
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = "http://127.0.0.1:%d" % port
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "unused", max_retries=0, timeout=60)

    def metrics(self) -> dict:
        return parse_prometheus(httpx.get(self.url + "/metrics", timeout=10).text)

    def wait_idle(self, timeout_s: float = 10.0) -> dict:
        """Metrics once nothing runs or waits and used KV pages are back to 0."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            if (m[("vmem_requests_running", ())] == 0 and m[("vmem_requests_waiting", ())] == 0
                    and m[("vmem_kv_pages", (("state", "used"),))] == 0):
                return m
            assert time.monotonic() < deadline, "server not idle after %.0f s: %s" % (
                timeout_s, {k: v for k, v in m.items() if k[0].startswith("vmem_requests") or k[0] == "vmem_kv_pages"})
            time.sleep(0.05)

    def stop(self) -> None:
        self.gate.open()
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.engine.close()


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict:
    """Prometheus text exposition -> {(name, ((label, value), ...)): float}; raises on a bad line."""
    samples, types = {}, {}
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            types[name] = kind
            continue
        if line.startswith("#"):
            assert line.startswith("# HELP "), line
            continue
        m = _SAMPLE.match(line)
        assert m, "not a Prometheus sample line: %r" % line
        labels = tuple(sorted(_LABEL.findall(m.group(3) or "")))
        value = float(m.group(4))   # accepts NaN, +Inf
        key = (m.group(1), labels)
        assert key not in samples, "duplicate sample %r" % (key,)
        samples[key] = value
    for name, kind in types.items():
        if kind == "histogram":
            assert (name + "_count", ()) in samples and (name + "_sum", ()) in samples
            assert samples[(name + "_bucket", (("le", "+Inf"),))] == samples[(name + "_count", ())]
    return samples


pytestmark = pytest.mark.usefixtures("one_thread")     # conftest: one intra-op thread for the tiny model


@pytest.fixture(scope="module")
def reference():
    """A second engine, built like the server's, driven directly: the expected outputs."""
    engine = build_engine(**ENGINE_KW)
    yield engine
    engine.close()


def engine_greedy(engine, prompt_ids: list[int], max_tokens: int, **params) -> list[int]:
    """The tokens ``engine`` generates for one request on its own."""
    request_id = "ref-%d" % time.monotonic_ns()
    engine.add_request(Request(request_id, list(prompt_ids), SamplingParams(max_tokens=max_tokens, **params)))
    out: list[int] = []
    while engine.has_work():
        for o in engine.step():
            out += o.new_token_ids
    return out


@pytest.fixture(scope="module")
def server():
    live = LiveServer(build_engine(**ENGINE_KW), ServerLimits(max_queued=1024))
    yield live
    live.stop()


# ---------------------------------------------------------------------------------------------
# Completions and chat, streaming and not

def test_completion_equals_engine_greedy_output(server, reference):
    prompt = "The virtual memory of a KV cache"
    tok = server.engine.tokenizer
    r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True})
    expected = engine_greedy(reference, tok.encode(prompt), 12, ignore_eos=True)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert r.choices[0].text == tok.decode(expected)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completion_accepts_token_ids(server, reference):
    ids = server.engine.tokenizer.encode("token ids in")
    r = server.client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    expected = engine_greedy(reference, ids, 5)
    assert r.choices[0].text == server.engine.tokenizer.decode(expected)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(expected)


def test_streaming_completion_matches_and_reports_usage(server):
    prompt = "Stream me some bytes"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = server.client.completions.create(**kw)
    chunks = list(server.client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert not chunks[-1].choices and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_wire_format_ends_with_done(server):
    body = {"model": MODEL, "prompt": "wire", "max_tokens": 4, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        chunk = json.loads(e[len("data: "):])
        assert chunk["object"] == "text_completion" and len(chunk["choices"]) == 1
        assert "usage" not in chunk   # not asked for


def test_continuous_usage_stats_puts_usage_in_every_chunk(server):
    # stream_options.continuous_usage_stats (vLLM's) is accepted, so it must be honoured, not ignored.
    kw = dict(model=MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}, stream=True,
              stream_options={"include_usage": True, "continuous_usage_stats": True})
    for chunks in (list(server.client.completions.create(prompt="count me", **kw)),
                   list(server.client.chat.completions.create(messages=[{"role": "user", "content": "count"}],
                                                              **kw))):
        assert all(c.usage is not None for c in chunks)
        counts = [c.usage.completion_tokens for c in chunks]
        assert counts == sorted(counts) and counts[-1] == 6
        assert not chunks[-1].choices and all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in chunks)


def test_chat_completion_and_stream(server, reference):
    tok = server.engine.tokenizer
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    r = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    prompt = tok.apply_chat_template(messages)
    prompt_ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
    expected = engine_greedy(reference, prompt_ids, 8)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(expected)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(expected)

    chunks = list(server.client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]


@pytest.mark.parametrize("cache_kind", ["paged", "static"])
def test_baseline_caches_serve_the_same_tokens(cache_kind, reference):
    live = LiveServer(build_engine(**{**ENGINE_KW, "cache_kind": cache_kind}))
    try:
        prompt = "same tokens on every cache"
        r = live.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
        tok = live.engine.tokenizer
        assert r.choices[0].text == tok.decode(engine_greedy(reference, tok.encode(prompt), 6, ignore_eos=True))
        assert live.wait_idle()[("vmem_kv_pages", (("state", "total"),))] > 0
    finally:
        live.stop()


def test_stop_string_cuts_the_text(server, reference):
    tok = server.engine.tokenizer
    prompt = "Stop strings are cut"
    full = tok.decode(engine_greedy(reference, tok.encode(prompt), 24, ignore_eos=True))
    # a stop string from the middle of the greedy output, clear of undecodable bytes
    candidates = [i for i in range(2, len(full) - 2) if "\ufffd" not in full[i:i + 2]]
    if not candidates:
        pytest.skip("greedy output has no clean 2-character stop string")
    i = candidates[0]
    stop = full[i:i + 2]
    r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                         stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]


def test_models_health_metrics(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    h = httpx.get(server.url + "/health", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    m = server.metrics()
    for state in ("total", "used", "mapped", "reclaimable", "free"):
        assert ("vmem_kv_pages", (("state", state),)) in m
        assert ("vmem_kv_bytes", (("state", state),)) in m
    assert m[("vmem_kv_pages", (("state", "total"),))] > 0
    for name in ("vmem_requests_running", "vmem_requests_waiting", "vmem_preemptions_total",
                 "vmem_time_to_first_token_seconds_count", "vmem_e2e_request_latency_seconds_count",
                 "vmem_time_per_output_token_seconds_count"):
        assert (name, ()) in m


# ---------------------------------------------------------------------------------------------
# Load, disconnects, limits

def test_200_concurrent_requests_all_answered_and_memory_returns(server):
    idle = server.wait_idle()
    done_before = idle.get(("vmem_requests_finished_total", (("reason", "length"),)), 0)
    n = 200

    async def one(client, i):
        kw = dict(model=MODEL, prompt="request %d says" % i, max_tokens=1 + i % 3, temperature=0,
                  extra_body={"ignore_eos": True})
        if i % 2:
            chunks = [c async for c in await client.completions.create(
                stream=True, stream_options={"include_usage": True}, **kw)]
            return i, chunks[-1].usage.completion_tokens
        r = await client.completions.create(**kw)
        return i, r.usage.completion_tokens

    async def run_all():
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=n), timeout=60)
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                    http_client=http)
        async with http:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(n))), 60)

    t0 = time.monotonic()
    results = asyncio.run(run_all())   # any 4xx/5xx raises an openai.APIStatusError here
    assert time.monotonic() - t0 < 60
    assert sorted(i for i, _ in results) == list(range(n))
    assert all(tokens == 1 + i % 3 for i, tokens in results)
    after = server.wait_idle()
    assert after[("vmem_requests_finished_total", (("reason", "length"),))] - done_before == n
    assert after.get(("vmem_requests_rejected_total", (("status", "429"),)), 0) == 0
    assert after[("vmem_kv_pages", (("state", "used"),))] == idle[("vmem_kv_pages", (("state", "used"),))]


def test_seeded_sampling_is_reproducible(server):
    kw = dict(model=MODEL, prompt="sample", max_tokens=8, temperature=0.9, top_p=0.95, seed=1234,
              extra_body={"ignore_eos": True})
    a = server.client.completions.create(**kw).choices[0].text
    b = server.client.completions.create(**kw).choices[0].text
    other_seed = server.client.completions.create(**{**kw, "seed": 4321}).choices[0].text
    greedy = server.client.completions.create(**{**kw, "temperature": 0}).choices[0].text
    assert a == b
    assert other_seed != a and greedy != a      # it samples: not argmax, and the seed matters


def test_engine_failure_is_a_500_error_json_and_serving_goes_on(server):
    server.wait_idle()
    server.gate.fail_next = RuntimeError("injected step failure")
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "boom", "max_tokens": 3},
                   timeout=30)
    assert r.status_code == 500
    assert "injected step failure" in r.json()["error"]["message"]
    server.gate.fail_next = RuntimeError("injected again")
    body = {"model": MODEL, "prompt": "boom", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as s:
        events = [e for e in "".join(s.iter_text()).split("\n\n") if e]
    assert "injected again" in json.loads(events[-2][len("data: "):])["error"]["message"]
    assert events[-1] == "data: [DONE]"
    m = server.wait_idle(timeout_s=5)   # the failed requests' slots were freed
    assert m[("vmem_requests_finished_total", (("reason", "error"),))] >= 2
    assert server.client.completions.create(model=MODEL, prompt="after", max_tokens=2).usage.completion_tokens >= 1


def test_preemption_under_memory_pressure_loses_nothing(reference):
    # 4 KiB pages (32 tokens of the tiny model per page and plane) and 48 of them: 12 requests of
    # 60 tokens outgrow the memory, so the engine preempts and recomputes behind the server.
    engine = build_engine(**{**ENGINE_KW, "page_bytes": 4096, "memory_bytes": 48 * 4096})
    live = LiveServer(engine)
    prompts = ["pressure %d builds up" % i for i in range(12)]

    async def one(client, prompt):
        chunks = [c async for c in await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=60, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})]
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens

    async def run_all():
        client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        everything = asyncio.ensure_future(asyncio.gather(*(one(client, p) for p in prompts)))
        async with httpx.AsyncClient(timeout=10) as http:   # all 12 queued before any runs
            deadline = time.monotonic() + 20
            while parse_prometheus((await http.get(live.url + "/metrics")).text)[
                    ("vmem_requests_waiting", ())] < len(prompts):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
        live.gate.open()
        return await asyncio.wait_for(everything, 60)

    live.gate.close()
    try:
        results = asyncio.run(run_all())
        m = live.wait_idle()
        assert m[("vmem_preemptions_total", ())] > 0
        tok = engine.tokenizer
        for prompt, (text, num_tokens) in zip(prompts, results):
            assert num_tokens == 60
            assert text == tok.decode(engine_greedy(reference, tok.encode(prompt), 60, ignore_eos=True))
    finally:
        live.stop()


def test_request_that_can_never_fit_in_memory_is_a_400():
    # 4 pages of 4 KiB: one page per layer and K/V, 32 tokens; the request outgrows it alone.
    live = LiveServer(build_engine(**{**ENGINE_KW, "page_bytes": 4096, "memory_bytes": 4 * 4096}))
    body = {"model": MODEL, "prompt": "0123456789", "max_tokens": 60, "ignore_eos": True}
    try:
        r = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large", r.text
        with httpx.stream("POST", live.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as s:
            events = [e for e in "".join(s.iter_text()).split("\n\n") if e]
        assert json.loads(events[-2][len("data: "):])["error"]["code"] == "request_too_large"
        assert events[-1] == "data: [DONE]"
        with pytest.raises(openai.APIError, match="does not fit"):   # the official client raises it
            list(live.client.completions.create(model=MODEL, prompt=body["prompt"], max_tokens=60, stream=True,
                                                extra_body={"ignore_eos": True}))
        m = live.wait_idle()
        assert m[("vmem_requests_finished_total", (("reason", "error"),))] == 3
        ok = live.client.completions.create(model=MODEL, prompt="short", max_tokens=8)   # fits: still served
        assert ok.usage.completion_tokens >= 1
    finally:
        live.stop()


def test_broken_allocator_invariants_take_the_server_down_loudly():
    from vmem.errors import VmemIntegrityError
    live = LiveServer(build_engine(**ENGINE_KW))
    try:
        def broken():
            raise VmemIntegrityError("injected: page table disagrees with the mappings")
        live.engine.cache.check_integrity = broken   # checked each time the engine goes idle
        r = live.client.completions.create(model=MODEL, prompt="last one", max_tokens=2)
        assert r.usage.completion_tokens >= 1
        deadline = time.monotonic() + 5
        while httpx.get(live.url + "/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        after = httpx.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=5)
        assert after.status_code == 503 and "injected" in after.json()["error"]["message"]
        assert live.metrics()[("vmem_engine_up", ())] == 0
    finally:
        live.stop()


def _aborts(m: dict) -> float:
    return m.get(("vmem_requests_finished_total", (("reason", "abort"),)), 0)


def test_streaming_client_disconnect_frees_its_slot(server):
    before = _aborts(server.wait_idle())
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": MAX_SEQ_LEN - 32, "stream": True,
            "ignore_eos": True, "temperature": 0}
    server.gate.allow(3)   # prefill + 2 decodes: 3 tokens, then the engine holds mid-generation
    try:
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", server.url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                server.gate.wait_held()   # the three steps ran; the request sits mid-generation
                m = server.metrics()
                assert m[("vmem_requests_running", ())] == 1
                assert m[("vmem_kv_pages", (("state", "used"),))] > 0
            # leaving the blocks closes the connection mid-stream
    finally:
        server.gate.open()
    m = server.wait_idle(timeout_s=5)
    assert _aborts(m) == before + 1


def test_non_streaming_client_that_goes_away_is_aborted(server):
    before = _aborts(server.wait_idle())
    body = {"model": MODEL, "prompt": "x", "max_tokens": MAX_SEQ_LEN - 8, "ignore_eos": True}
    server.gate.close()   # the request cannot finish before the client gives up
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    finally:
        server.gate.open()
    m = server.wait_idle(timeout_s=5)
    assert _aborts(m) == before + 1


BAD_REQUESTS = [
    # (id, path, body or raw bytes, status, words in the message)
    ("prompt too long", "/v1/completions", {"model": MODEL, "prompt": "x" * (2 * MAX_SEQ_LEN)}, 400, "prompt"),
    ("max_tokens too large", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10 * MAX_SEQ_LEN},
     400, "max_tokens"),
    ("max_tokens negative", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens zero", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens string", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("missing model", "/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
     400, "role"),
    ("unknown model", "/v1/completions", {"model": "gpt-17", "prompt": "hi"}, 404, "gpt-17"),
    ("bad json", "/v1/completions", b'{"model": "tiny", "prompt": ', 400, "JSON"),
    ("not an object", "/v1/completions", b"[1, 2, 3]", 400, "JSON object"),
    ("stream not bool", "/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("n > 1", "/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}, 400, "n=1"),
    ("token id out of vocab", "/v1/completions", {"model": MODEL, "prompt": [1, 10 ** 6]}, 400, "vocabulary"),
    ("temperature range", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 9.0}, 400, "temperature"),
    ("batched prompts", "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "one prompt"),
    ("lone surrogate in prompt", "/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', 400, "UTF-8"),
    ("lone surrogate in chat", "/v1/chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}', 400, "UTF-8"),
    ("seed too large", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 1.0, "seed": 2 ** 64},
     400, "seed"),
]


@pytest.mark.parametrize("path,body,status,words", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_4xx_with_a_reason(server, path, body, status, words):
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=10)
    else:
        r = httpx.post(server.url + path, json=body, timeout=10)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words.lower() in err["message"].lower(), err
    assert err["type"] and isinstance(err["message"], str)


def test_openai_client_sees_typed_errors_and_server_keeps_serving(server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client.completions.create(model=MODEL, prompt="hi", max_tokens=10 * MAX_SEQ_LEN)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        list(server.client.completions.create(model=MODEL, prompt="hi", max_tokens=-1, stream=True))
    r = server.client.completions.create(model=MODEL, prompt="still here", max_tokens=2)
    assert r.usage.completion_tokens >= 1


def test_queue_full_answers_429():
    live = LiveServer(build_engine(**ENGINE_KW), ServerLimits(max_queued=1))
    body = {"model": MODEL, "prompt": "hold", "max_tokens": 4, "ignore_eos": True}
    try:
        live.gate.close()   # nothing gets to run: the first request stays queued
        with httpx.Client(timeout=30) as a:
            with a.stream("POST", live.url + "/v1/completions", json={**body, "stream": True}) as first:
                assert first.status_code == 200
                assert live.metrics()[("vmem_requests_waiting", ())] == 1
                second = httpx.post(live.url + "/v1/completions", json=body, timeout=10)
                assert second.status_code == 429, second.text
                assert second.json()["error"]["code"] == "queue_full"
                assert "queued" in second.json()["error"]["message"]
                live.gate.open()
                assert "".join(first.iter_text()).endswith("data: [DONE]\n\n")
        m = live.wait_idle(timeout_s=5)
        assert m[("vmem_requests_rejected_total", (("status", "429"),))] == 1
        assert m[("vmem_requests_finished_total", (("reason", "length"),))] == 1
    finally:
        live.stop()


# ---------------------------------------------------------------------------------------------
# The `vmem serve` entry point, as a process

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_main_serves_and_shuts_down_gracefully():
    port = _free_port()
    cmd = [sys.executable, "-m", "vmem", "serve", "--model", MODEL, "--cache", "vmem", "--max-batch", "2",
           "--max-seq-len", str(MAX_SEQ_LEN), "--backend", "host", "--port", str(port), "--log-level", "warning",
           "--torch-threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = "http://127.0.0.1:%d" % port
        wait_for_server(proc, url, timeout_s=40)
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        # SIGINT while a stream runs: the stream still ends properly, then the process exits 0
        body = {"model": MODEL, "prompt": "finish me", "max_tokens": 24, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGINT)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["usage"]["completion_tokens"] == 24
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("text", ["12x", "infG", "nanM", "1e400K", ""])
def test_bad_memory_sizes_are_usage_errors(text):
    import argparse

    from vmem.cli import parse_bytes
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)
    assert parse_bytes("1.5K") == 1536 and parse_bytes("2GiB") == 2 << 30 and parse_bytes("4096") == 4096
