"""The Engine API the server codes against: build_engine, stop strings, stats, close."""

import pytest

from vmem.engine.engine import Request, RequestOutput, SamplingParams, build_engine
from vmem.engine.model import ModelConfig
from vmem.errors import VmemInvalidArgument

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


def test_seed_torch_cannot_take_is_refused_at_add_request():
    engine = build_engine("tiny", "vmem", max_batch=2, max_seq_len=64)
    try:
        with pytest.raises(VmemInvalidArgument, match="seed"):
            engine.add_request(Request("s", [1, 2], SamplingParams(max_tokens=2, temperature=1.0, seed=2 ** 64)))
        assert not engine.has_work()
    finally:
        engine.close()


def test_request_past_the_models_max_position_is_refused_at_add_request():
    # max_seq_len beyond the model's rotary table: the engine's bound is the smaller of the two, so a
    # request that would reach a position the model has no embedding for never gets into a step.
    engine = build_engine(ModelConfig.preset("tiny", max_position=64), "vmem", max_batch=2, max_seq_len=128)
    try:
        assert engine.max_seq_len == 64
        with pytest.raises(VmemInvalidArgument, match="64"):
            engine.add_request(Request("long", [1] * 60, SamplingParams(max_tokens=10)))
        assert not engine.has_work()
        engine.add_request(Request("ok", [1] * 60, SamplingParams(max_tokens=4, ignore_eos=True)))
        toks, last = collect(engine, "ok")
        assert len(toks) == 4 and last.finish_reason == "length"
    finally:
        engine.close()


def test_near_zero_temperature_and_top_p_sample_the_top_token():
    # temperature 1e-320 overflows logits / T to inf and top_p 1e-320 rounds to 0 in float32: both used to
    # raise in the step (failing every request in flight); they mean "the most likely token", as greedy.
    engine = build_engine("tiny", "vmem", max_batch=4, max_seq_len=64)
    try:
        prompt = engine.tokenizer.encode("tiny knobs")
        engine.add_request(Request("greedy", prompt, SamplingParams(max_tokens=6, ignore_eos=True)))
        greedy, _ = collect(engine, "greedy")
        for rid, params in (("t", dict(temperature=1e-320)), ("p", dict(temperature=1.0, top_p=1e-320)),
                            ("both", dict(temperature=1e-9, top_p=1e-9))):
            engine.add_request(Request(rid, prompt, SamplingParams(max_tokens=6, ignore_eos=True, seed=1, **params)))
            got, last = collect(engine, rid)
            assert got == greedy and last.finish_reason == "length", rid
    finally:
        engine.close()


BAD_PARAMS = [
    ("temperature nan", dict(temperature=float("nan"))), ("temperature inf", dict(temperature=float("inf"))),
    ("temperature string", dict(temperature="0.5")), ("top_p nan", dict(top_p=float("nan"))),
    ("max_tokens nan", dict(max_tokens=float("nan"))), ("max_tokens 2.5", dict(max_tokens=2.5)),
    ("max_tokens True", dict(max_tokens=True)), ("stop of ints", dict(stop=[1])),
    ("stop a string", dict(stop="ab")), ("stop empty string", dict(stop=[""])),
    ("seed float", dict(temperature=1.0, seed=1.5)), ("ignore_eos string", dict(ignore_eos="no")),
]


@pytest.mark.parametrize("params", [b[1] for b in BAD_PARAMS], ids=[b[0] for b in BAD_PARAMS])
def test_bad_sampling_params_are_refused_at_the_door_and_requests_in_flight_finish(params):
    # Before: accepted, then the next step raised and failed every request in flight.
    engine = build_engine("tiny", "vmem", max_batch=4, max_seq_len=128, backend="host")
    try:
        ids = engine.tokenizer.encode("in flight")
        engine.add_request(Request("ok", ids, SamplingParams(max_tokens=6, ignore_eos=True)))
        engine.step()
        with pytest.raises(VmemInvalidArgument):
            engine.add_request(Request("bad", ids, SamplingParams(**{"max_tokens": 4, **params})))
        toks, last = collect(engine, "ok")
        assert len(toks) == 5 and last.finish_reason == "length"
        assert engine.stats()["live_slots"] == 0
    finally:
        engine.close()


@pytest.mark.parametrize("prompt_ids", [[1.5, 2], [True, 3], ["a"]])
def test_prompt_ids_that_are_not_integers_are_refused(prompt_ids):
    engine = build_engine("tiny", "vmem", max_batch=2, max_seq_len=64, backend="host")
    try:
        with pytest.raises(VmemInvalidArgument, match="integers"):
            engine.add_request(Request("r", prompt_ids, SamplingParams(max_tokens=2)))
        assert not engine.has_work()
    finally:
        engine.close()
