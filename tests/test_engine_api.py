"""The Engine API the server codes against: build_engine, stop strings, stats, close."""

import pytest

from vmem.engine.engine import Request, RequestOutput, SamplingParams, build_engine

pytestmark = pytest.mark.usefixtures("one_thread")

def collect(engine, rid):
    toks, last = [], None
    while engine.has_work():
        for out in engine.step():
            assert isinstance(out, RequestOutput)
            if out.request_id == rid:
                toks.extend(out.new_token_ids)
                last = out
    return toks, last


@pytest.mark.parametrize("kind", ["vmem", "paged", "static"])
def test_build_engine_runs_each_cache(kind):
    engine = build_engine("tiny", kind, max_batch=4, max_seq_len=128, memory_bytes=4 * 128 * 512)
    try:
        ids = engine.tokenizer.encode("hello, world")
        engine.add_request(Request("a", ids, SamplingParams(max_tokens=5, ignore_eos=True)))
        toks, last = collect(engine, "a")
        assert len(toks) == 5 and last.finished and last.finish_reason == "length"
        assert (last.num_prompt_tokens, last.num_output_tokens) == (len(ids), 5)
        s = engine.stats()
        assert s["cache_kind"] == kind and s["num_running"] == 0 and s["num_waiting"] == 0
        assert s["steps"] >= 5 and s["finished"] == 1 and s["live_slots"] == 0
    finally:
        engine.close()


def test_stop_string_finishes_with_stop():
    engine = build_engine("tiny", "vmem", max_batch=2, max_seq_len=128)
    try:
        prompt = engine.tokenizer.encode("The quick brown fox")
        engine.add_request(Request("free", prompt, SamplingParams(max_tokens=40, ignore_eos=True)))
        toks, _ = collect(engine, "free")
        k = next(i for i, t in enumerate(toks) if 32 <= t < 127)       # first printable ASCII token
        stop = chr(toks[k])
        engine.add_request(Request("stopped", prompt, SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop])))
        got, last = collect(engine, "stopped")
        assert last.finish_reason == "stop" and got == toks[:len(got)] and len(got) <= k + 1
        assert stop in engine.tokenizer.decode(got)
    finally:
        engine.close()
