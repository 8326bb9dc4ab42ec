"""EngineLoop on its own: the thread that owns the engine behind the server (real tiny engine)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from vmem.engine.engine import Request, SamplingParams, build_engine
from vmem.server.loop import EngineLoop, ShuttingDown
from vmem.errors import VmemInvalidArgument

KW = dict(model="tiny", cache_kind="vmem", max_batch=4, max_seq_len=128, backend="host")


class Collector:
    """A sink per request; records what arrives, on whatever thread it runs."""

    def __init__(self):
        self.items: dict[str, list] = {}
        self.done: dict[str, threading.Event] = {}

    def sink(self, request_id: str):
        self.items[request_id] = []
        self.done[request_id] = threading.Event()

        def put(item):
            self.items[request_id].append(item)
            if isinstance(item, BaseException) or item.finished:
                self.done[request_id].set()
        return put

    def wait(self, request_id: str, timeout_s: float = 20.0):
        assert self.done[request_id].wait(timeout_s), "no final output for %s" % request_id
        return self.items[request_id]


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)   # the tiny model's ops are too small to split
    yield
    torch.set_num_threads(before)


@pytest.fixture
def engine():
    eng = build_engine(**KW)
    yield eng
    eng.close()


def request(request_id: str, text: str, max_tokens: int, tokenizer) -> Request:
    return Request(request_id, tokenizer.encode(text), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def test_outputs_reach_their_sinks_and_match_a_direct_run(engine):
    tok = engine.tokenizer
    direct = build_engine(**KW)
    try:
        expected = {}
        for i in range(6):
            direct.add_request(request("r%d" % i, "prompt number %d" % i, 5 + i, tok))
        while direct.has_work():
            for out in direct.step():
                expected.setdefault(out.request_id, []).extend(out.new_token_ids)
    finally:
        direct.close()

    loop, got = EngineLoop(engine), Collector()
    loop.start()
    try:
        for i in range(6):
            loop.submit(request("r%d" % i, "prompt number %d" % i, 5 + i, tok), got.sink("r%d" % i))
        for i in range(6):
            outs = got.wait("r%d" % i)
            assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
            assert sum((o.new_token_ids for o in outs), []) == expected["r%d" % i]
            assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 5 + i
        deadline = time.monotonic() + 5
        while loop.num_running or loop.stats.get("used_pages"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert loop.num_queued == 0 and loop.num_steps > 0
    finally:
        loop.stop()


def test_a_request_the_engine_refuses_gets_the_exception(engine):
    loop, got = EngineLoop(engine), Collector()
    loop.start()
    try:
        too_long = Request("big", [65] * 100, SamplingParams(max_tokens=100))   # 200 > max_seq_len 128
        loop.submit(too_long, got.sink("big"))
        (item,) = got.wait("big")
        assert isinstance(item, VmemInvalidArgument)
        loop.abort("big")            # unknown to the engine by now: ignored
        loop.abort("never-seen")
        loop.submit(request("ok", "fine", 2, engine.tokenizer), got.sink("ok"))
        assert got.wait("ok")[-1].finished
    finally:
        loop.stop()


def test_abort_frees_the_slot_and_stop_fails_what_is_left():
    engine = build_engine(**{**KW, "max_seq_len": 1024})   # room for long requests
    loop, got = EngineLoop(engine), Collector()
    loop.start()
    tok = engine.tokenizer
    try:
        loop.submit(request("long", "a long one", 1000, tok), got.sink("long"))
        loop.submit(request("other", "another", 1000, tok), got.sink("other"))
        deadline = time.monotonic() + 10
        while not (got.items["long"] and got.items["other"]):   # both are running
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert not any(isinstance(i, BaseException) for i in got.items["long"] + got.items["other"])
        loop.abort("long")
        while loop.num_running != 1:   # published after the first step that follows the abort
            assert time.monotonic() < deadline
            time.sleep(0.005)
        n = len(got.items["long"])
        time.sleep(0.02)
        assert len(got.items["long"]) == n and not got.items["long"][-1].finished   # silence after it
        # Hold the engine at its next step so "other" is surely unfinished when the loop stops.
        gate = threading.Event()
        inner = engine.step
        engine.step = lambda: (gate.wait(10), inner())[1]
        threading.Timer(0.1, gate.set).start()
    finally:
        loop.stop()
    try:
        assert isinstance(got.wait("other")[-1], ShuttingDown)
        loop.submit(request("late", "too late", 2, tok), got.sink("late"))   # answered, not lost
        assert isinstance(got.wait("late", timeout_s=1)[-1], ShuttingDown)
        assert engine.num_running == 0 and engine.num_waiting == 0
        assert engine.cache.stats().used_pages == 0
        assert not loop.alive
    finally:
        engine.close()


def test_stop_says_whether_the_thread_is_gone(engine):
    # `vmem serve` closes the engine (and unmaps the cache) after stop(); it may only do so once the
    # engine thread has left its step, so stop() must say whether the join timed out.
    loop, got = EngineLoop(engine), Collector()
    gate, entered = threading.Event(), threading.Event()
    inner = engine.step
    engine.step = lambda: (entered.set(), gate.wait(10), inner())[2]
    loop.start()
    try:
        loop.submit(request("held", "hold me", 4, engine.tokenizer), got.sink("held"))
        assert entered.wait(10)            # the engine thread is inside step()
        assert loop.stop(timeout_s=0.05) is False and loop.thread_alive
    finally:
        gate.set()
    assert loop.stop() is True and not loop.thread_alive
    assert isinstance(got.wait("held")[-1], ShuttingDown)
