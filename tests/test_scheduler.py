"""Scheduler behaviours on real caches: FCFS admission, slots, memory admission, chunked prefill,
preemption order and count, abort, typed errors for requests that can never run."""

import pytest

from vmem.allocator import KVCacheSpec, make_cache
from vmem.engine.engine import Engine, Request, SamplingParams
from vmem.errors import VmemInvalidArgument

pytestmark = pytest.mark.usefixtures("one_thread")


def new_engine(model, kind="vmem", *, max_batch=4, max_seq_len=128, memory_tokens=None, chunk=32, budget=128,
               **cache_kw):
    c = model.config
    spec = KVCacheSpec.for_model(c, max_batch=max_batch, max_seq_len=max_seq_len, page_bytes=4096)
    token_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * c.dtype.itemsize
    memory_tokens = memory_tokens or max_batch * max_seq_len
    cache = make_cache(kind, spec, memory_bytes=memory_tokens * token_bytes, **cache_kw)
    return Engine(model, cache, max_num_batched_tokens=budget, prefill_chunk_tokens=chunk)


def req(rid, n_prompt, max_tokens=4):
    return Request(rid, [(i * 7 + len(rid)) % 256 for i in range(n_prompt)],
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def drain(engine):
    order, steps = [], 0
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
        steps += 1
    return order, steps


@pytest.mark.parametrize("kind", ["vmem", "paged", "static"])
def test_fcfs_and_slot_limit(model, kind):
    engine = new_engine(model, kind, max_batch=2)
    try:
        for i in range(5):
            engine.add_request(req(f"r{i}", 10, max_tokens=3 + i))
        engine.step()
        assert engine.num_running == 2 and engine.num_waiting == 3
        assert [s.request_id for s in engine.scheduler.running] == ["r0", "r1"]
        order, _ = drain(engine)
        assert order == ["r0", "r1", "r2", "r3", "r4"]
        assert engine.cache.num_free_slots == 2
    finally:
        engine.close()


def test_chunked_prefill_and_token_budget(model):
    engine = new_engine(model, chunk=32, budget=40)
    try:
        engine.add_request(req("long", 100, max_tokens=2))
        engine.add_request(req("short", 5, max_tokens=2))
        first = engine.step()
        seqs = {s.request_id: s for s in engine.scheduler.running}
        assert seqs["long"].num_cached_tokens == 32          # one chunk
        assert seqs["short"].num_cached_tokens == 5          # the budget had 8 tokens left
        assert [o.request_id for o in first] == ["short"]    # only a sequence that reached its end samples
        outs = [engine.step() for _ in range(3)]
        assert seqs["long"].num_cached_tokens == 100
        assert any(o.request_id == "long" for o in outs[-1])
        drain(engine)
    finally:
        engine.close()


def test_admission_waits_for_memory_then_runs(model):
    # room for ~150 tokens: two 60-token prompts fit, the third waits although a slot is free
    engine = new_engine(model, max_batch=4, memory_tokens=150, chunk=64, budget=256)
    try:
        for i in range(3):
            engine.add_request(req(f"r{i}", 60, max_tokens=2))
        engine.step()
        assert engine.num_running == 2 and engine.num_waiting == 1 and engine.cache.num_free_slots == 2
        order, _ = drain(engine)
        assert sorted(order) == ["r0", "r1", "r2"] and engine.num_preemptions == 0
    finally:
        engine.close()


def test_preemption_takes_the_newest_and_requeues_it_first(model):
    engine = new_engine(model, max_batch=4, memory_tokens=130, chunk=64, budget=256)
    engine.scheduler.new_token_ratio = engine.scheduler.min_new_token_ratio = 0.0   # optimistic admission
    try:
        engine.add_request(req("old", 40, max_tokens=60))
        engine.add_request(req("new", 40, max_tokens=60))
        engine.add_request(req("later", 10, max_tokens=2))
        preempted_at = None
        for step in range(200):
            engine.step()
            if engine.num_preemptions and preempted_at is None:
                preempted_at = step
                assert [s.request_id for s in engine.scheduler.running] == ["old"]
                assert engine.scheduler.waiting[0].request_id == "new"      # back at the front
            if not engine.has_work():
                break
        assert preempted_at is not None and engine.num_preemptions >= 1
        assert engine.stats()["num_preemptions"] == engine.num_preemptions
    finally:
        engine.close()


def test_admission_reserves_room_for_output_and_avoids_preemption(model):
    """Same traffic as above with the default new_token_ratio: "new" waits for "old" instead. (The two
    prompts are equal: with prefix caching "new" would find old's first page cached and need less.)"""
    engine = new_engine(model, max_batch=4, memory_tokens=130, chunk=64, budget=256, prefix_caching=False)
    try:
        engine.add_request(req("old", 40, max_tokens=60))
        engine.add_request(req("new", 40, max_tokens=60))
        engine.step()
        assert [s.request_id for s in engine.scheduler.running] == ["old"] and engine.num_waiting == 1
        order, _ = drain(engine)
        assert order == ["old", "new"] and engine.num_preemptions == 0
    finally:
        engine.close()


def test_abort_frees_the_slot_at_once(model):
    engine = new_engine(model, max_batch=2)
    try:
        engine.add_request(req("a", 20, max_tokens=50))
        engine.add_request(req("b", 20, max_tokens=50))
        engine.add_request(req("c", 20, max_tokens=50))
        engine.step()
        assert engine.cache.num_free_slots == 0
        engine.abort("a")
        engine.abort("c")            # still waiting
        engine.abort("unknown")      # ignored
        assert engine.cache.num_free_slots == 1 and engine.num_waiting == 0
        outs = engine.step()
        aborted = {o.request_id for o in outs if o.finish_reason == "abort"}
        assert aborted == {"a", "c"}
        engine.abort("b")
        drain(engine)
        assert engine.cache.num_free_slots == 2 and engine.cache.stats().used_pages == 0
    finally:
        engine.close()


def test_bad_requests_are_typed_errors_and_change_nothing(model):
    engine = new_engine(model, max_seq_len=64)
    try:
        with pytest.raises(VmemInvalidArgument, match="max_seq_len"):
            engine.add_request(req("too-long", 60, max_tokens=10))
        with pytest.raises(VmemInvalidArgument):
            engine.add_request(Request("empty", [], SamplingParams()))
        with pytest.raises(VmemInvalidArgument):
            engine.add_request(Request("vocab", [100000], SamplingParams()))
        with pytest.raises(VmemInvalidArgument):
            engine.add_request(Request("zero", [1], SamplingParams(max_tokens=0)))
        engine.add_request(req("ok", 5))
        with pytest.raises(VmemInvalidArgument, match="already"):
            engine.add_request(req("ok", 5))
        assert engine.num_waiting == 1
        order, _ = drain(engine)
        assert order == ["ok"]
    finally:
        engine.close()


def test_request_that_never_fits_memory_finishes_with_error(model):
    engine = new_engine(model, max_batch=2, max_seq_len=128, memory_tokens=40, chunk=128, budget=256)
    try:
        engine.add_request(req("huge", 100, max_tokens=4))
        engine.add_request(req("small", 8, max_tokens=2))
        reasons = {}
        while engine.has_work():
            for o in engine.step():
                if o.finished:
                    reasons[o.request_id] = o.finish_reason
        assert reasons == {"huge": "error", "small": "length"}
    finally:
        engine.close()


def test_sampling_is_seeded(model):
    # Equal seeds give equal tokens; and sampling really samples: a second seed and greedy decoding
    # both give other tokens (this would fail if temperature > 0 fell back to argmax).
    engine = new_engine(model)
    try:
        params = dict(max_tokens=12, temperature=1.0, top_p=1.0, ignore_eos=True)
        requests = {"x": dict(seed=3), "y": dict(seed=3), "z": dict(seed=4), "greedy": dict(temperature=0.0)}
        for rid, extra in requests.items():
            engine.add_request(Request(rid, [1, 2, 3], SamplingParams(**{**params, **extra})))
        toks = {rid: [] for rid in requests}
        while engine.has_work():
            for o in engine.step():
                toks[o.request_id].extend(o.new_token_ids)
        assert toks["x"] == toks["y"] and len(toks["x"]) == 12
        assert toks["z"] != toks["x"]
        assert toks["greedy"] != toks["x"] and toks["greedy"] != toks["z"]
    finally:
        engine.close()
