"""Prefix caching: vmem's page aliasing (prefix.py + cache.py), paged's vLLM block hashing, the engine's
use of both, and the workloads that share prefixes (Mooncake trace, sessions over system prompts)."""

import numpy as np
import pytest
import torch

from conftest import greedy_reference
from vmem.allocator import KVCacheSpec, make_cache
from vmem.engine.engine import Engine, Request, SamplingParams
from vmem.engine.workloads import (MOONCAKE_CONV_JSONL, TokenRequest, ZipfLengths, generate_sessions,
                                   load_mooncake, mooncake_requests, prefix_reuse)
from vmem.errors import VmemError, VmemInvalidArgument

KINDS = ["vmem", "paged", "static"]


def spec(**kw):
    base = dict(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32, max_batch=4, max_seq_len=256,
                page_bytes=4096)
    base.update(kw)
    return KVCacheSpec(**base)


# ---- vmem: page aliasing -----------------------------------------------------------------------

def _vmem(columns=None, **kw):
    s = spec(**kw)
    memory = None if columns is None else columns * s.rows_per_slot * s.page_bytes
    return make_cache("vmem", s, backend="host", memory_bytes=memory)


def _fill(c, slot, first, end, value):
    for layer in range(c.spec.num_layers):
        for t in c.kv(layer):
            t[slot, first:end] = value


def _read(c, slot, first, end):
    return torch.cat([t[slot, first:end].reshape(-1) for layer in range(c.spec.num_layers) for t in c.kv(layer)])


def test_vmem_request_in_the_slot_holding_its_prefix_needs_no_map_call():
    with _vmem() as c:
        tpp = int(c.spec.tokens_per_page)                    # 32
        p = list(range(100))
        a = c.alloc_slot(token_ids=p)
        c.step({a: 100})
        assert c.cache_prefix(a, p) == 3 * tpp
        c.free_slot(a)
        calls = c.stats().map_calls, c.stats().unmap_calls
        b = c.alloc_slot(token_ids=p + [9])
        assert b == a and c.num_cached_tokens(b) == 3 * tpp
        assert c.pages_needed({b: 101}) == 0
        c.step({b: 101})
        assert (c.stats().map_calls, c.stats().unmap_calls) == calls
        assert c.prefix_stats()["inplace_pages"] == 3 * c.spec.rows_per_slot
        c.check_integrity()


def test_vmem_hit_maps_the_cached_pages_with_the_growth_in_one_native_call():
    with _vmem() as c:
        tpp, rows = int(c.spec.tokens_per_page), c.spec.rows_per_slot
        p = list(range(100))
        a = c.alloc_slot(token_ids=p)
        c.step({a: 100})
        _fill(c, a, 0, 100, 3.0)
        c.cache_prefix(a, p)
        b = c.alloc_slot(token_ids=p[:96] + [1] * 40)       # a is live: another slot
        assert b != a and c.num_cached_tokens(b) == 96
        assert c.pages_needed({b: 136}) == 2 * rows          # columns 3 and 4 are new; 0-2 are a's pages
        before = c.stats()
        c.step({b: 136})
        after = c.stats()
        assert after.map_calls - before.map_calls == 1
        assert after.pages_mapped - before.pages_mapped == 5 * rows
        assert after.used_pages - before.used_pages == 2 * rows        # aliases, not copies
        va = c.spec.slot_virtual_pages(a, 0, 3)
        vb = c.spec.slot_virtual_pages(b, 0, 3)
        m = c.reservation.mapping(0, c.spec.num_virtual_pages)
        assert np.array_equal(m[va], m[vb])
        assert torch.all(_read(c, b, 0, 96) == 3.0)
        assert c.prefix_stats()["kv_bytes_copied"] == 0
        c.check_integrity()
        with pytest.raises(VmemInvalidArgument):             # below its cached prefix: refused
            c.step({b: 50})
        q = torch.zeros(1, 1, 2, 16)
        with pytest.raises(VmemInvalidArgument):             # writing into the cached prefix: refused
            c.attention(0, q, q, q, torch.tensor([10], dtype=torch.int32), torch.tensor([b], dtype=torch.int32))


def test_vmem_cached_prefix_survives_an_unrelated_request_in_its_slot():
    """max_batch 1: the next request overwrites the slot, so the cached columns are unmapped from it,
    kept in the pool by the index, and mapped back for a later match with their data intact."""
    with _vmem(max_batch=1) as c:
        rows = c.spec.rows_per_slot
        p = list(range(70))
        a = c.alloc_slot(token_ids=p)
        c.step({a: 70})
        _fill(c, a, 0, 70, 5.0)
        c.cache_prefix(a, p)                                  # 2 columns
        c.free_slot(a)
        b = c.alloc_slot(token_ids=[7] * 70)
        assert c.num_cached_tokens(b) == 0 and c.prefix_stats()["unmap_calls"] == 1
        c.step({b: 70})
        _fill(c, b, 0, 70, -1.0)
        c.check_integrity()
        assert c.stats().used_pages == 3 * rows and c.prefix_stats()["cached_pages"] == 2 * rows
        c.free_slot(b)
        d = c.alloc_slot(token_ids=p + [1])
        assert c.num_cached_tokens(d) == 64
        c.step({d: 71})
        assert torch.all(_read(c, d, 0, 64) == 5.0)
        c.check_integrity()


def test_vmem_evicts_least_recently_used_leaf_first_and_counts_cached_pages():
    with _vmem(columns=6, max_batch=2) as c:
        rows = c.spec.rows_per_slot
        old, new = list(range(96)), list(range(100, 196))
        for p in (old, new):                                   # 3 columns each, cached, slots idle
            s = c.alloc_slot(token_ids=p)
            c.step({s: 96})
            c.cache_prefix(s, p)
            c.free_slot(s)
        assert c.stats().free_pages == 0 and c.stats().reclaimable_pages == 6 * rows
        x = c.alloc_slot(token_ids=new + [1])                  # locks new's path: 3 columns evictable
        assert c.can_allocate({x: 96 + 32 * 3}) and not c.can_allocate({x: 96 + 32 * 3 + 1})
        c.step({x: 97 + 32})                                   # 2 columns: old's last two (leaf first)
        assert c.match_prefix(old + [1]) == 32 and c.match_prefix(new + [1]) == 96
        assert c.prefix_stats()["evicted_pages"] == 2 * rows
        c.check_integrity()


def test_vmem_failed_map_after_eviction_puts_the_index_back():
    with _vmem(columns=4, max_batch=2) as c:
        p = list(range(96))
        s = c.alloc_slot(token_ids=p)
        c.step({s: 96})
        _fill(c, s, 0, 96, 2.0)
        c.cache_prefix(s, p)
        c.free_slot(s)
        t = c.alloc_slot()                                     # the other slot: no cached columns there
        assert t != s
        c.reservation.inject_fault(2)
        with pytest.raises(VmemError):
            c.step({t: 64})                                    # evicts 1 column, the map fails
        c.reservation.inject_fault(0)
        assert c.match_prefix(p + [1]) == 96
        c.check_integrity()
        c.free_slot(t)
        u = c.alloc_slot(token_ids=p + [1])
        c.step({u: 97})
        assert torch.all(_read(c, u, 0, 96) == 2.0)
        c.check_integrity()


# ---- paged: vLLM's block prefix caching ------------------------------------------------------

def test_paged_hits_full_blocks_and_shares_them_without_copy():
    s = spec()
    with make_cache("paged", s, backend="host", memory_bytes=20 * 16 * s.token_bytes) as c:
        prompt = list(range(50))
        a = c.alloc_slot(token_ids=prompt)
        assert c.num_cached_tokens(a) == 0
        c.step({a: 50})
        assert c.cache_prefix(a, prompt) == 48               # three full 16-token blocks
        b = c.alloc_slot(token_ids=prompt + [7, 7])
        assert c.num_cached_tokens(b) == 48
        assert list(c.block_table[b, :3]) == list(c.block_table[a, :3])
        assert c.pages_needed({b: 52}) == 1                 # only the fourth block is new
        c.step({b: 52})
        c.check_integrity()
        # all but the last token: a prompt of exactly the cached blocks recomputes its last block
        assert c.match_prefix(prompt[:48]) == 32
        assert c.match_prefix([1] + prompt[1:]) == 0        # a different first block breaks the chain
        c.free_slot(a)
        c.free_slot(b)
        c.check_integrity()
        assert c.prefix_stats()["kv_bytes_copied"] == 0


def test_paged_free_queue_is_lru_with_prompt_tails_evicted_first():
    s = spec()
    with make_cache("paged", s, backend="host", memory_bytes=6 * 16 * s.token_bytes) as c:
        p = list(range(100, 148))
        a = c.alloc_slot(token_ids=p)
        c.step({a: 48})
        c.cache_prefix(a, p)
        c.free_slot(a)                                      # 3 cached blocks queued, tail first
        assert c.match_prefix(p + [1]) == 48
        b = c.alloc_slot()
        c.step({b: 3 * 16 + 16})                            # 4 blocks: 3 never-used ones, then a's tail
        assert c.match_prefix(p + [1]) == 32
        assert c.prefix_stats()["evicted_pages"] == 1
        c.check_integrity()


def test_paged_prefix_caching_off_and_bad_token_ids():
    s = spec()
    with make_cache("paged", s, backend="host", prefix_caching=False) as c:
        a = c.alloc_slot(token_ids=list(range(40)))
        c.step({a: 40})
        assert c.cache_prefix(a, list(range(40))) == 0
        assert c.match_prefix(list(range(41))) == 0
        with pytest.raises(VmemInvalidArgument):
            c.alloc_slot(token_ids="abc")
        with pytest.raises(VmemInvalidArgument):
            c.cache_prefix(a, [1.5])


# ---- the engine: greedy outputs with prefix caching equal those without -----------------------

def _run(engine, reqs, add_every=2):
    got = {i: [] for i in range(len(reqs))}
    cached = {}
    pending = list(enumerate(reqs))
    while pending or engine.has_work():
        for i, (prompt, n) in pending[:add_every]:
            engine.add_request(Request(str(i), list(prompt), SamplingParams(max_tokens=n, ignore_eos=True)))
        pending = pending[add_every:]
        for out in engine.step():
            got[int(out.request_id)].extend(out.new_token_ids)
            if out.finished:
                cached[int(out.request_id)] = out.num_cached_tokens
        engine.cache.check_integrity()
    return [got[i] for i in range(len(reqs))], cached


def _sessions(num_sessions=6, seed=3):
    reqs = generate_sessions(num_sessions, rate=100.0, num_system_prompts=2, system_prompt_tokens=40,
                             turns=ZipfLengths(0.5, 1, 3), user_lengths=ZipfLengths(1.0, 4, 24),
                             output_lengths=ZipfLengths(0.5, 4, 24), think_time_s=0.01, seed=seed)
    return [(r.prompt_ids, r.output_tokens) for r in reqs]


@pytest.fixture(scope="module")
def shared_reqs(model):
    reqs = _sessions()
    return reqs, [greedy_reference(model, p, n) for p, n in reqs]


def _engine(model, kind, max_batch, memory_tokens, chunk=16, prefix_caching=True, page_bytes=4096, **kw):
    c = model.config
    s = KVCacheSpec.for_model(c, max_batch=max_batch, max_seq_len=192, page_bytes=page_bytes)
    cache = make_cache(kind, s, backend="host", memory_bytes=memory_tokens * s.token_bytes,
                       prefix_caching=prefix_caching, **kw)
    return Engine(model, cache, max_num_batched_tokens=48, prefill_chunk_tokens=chunk, async_map=False)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_with_prefix_caching_matches_full_recompute(model, shared_reqs, kind):
    """Slot reuse (3 slots, 13 requests) and chunked prefill (16-token chunks) with prefixes shared."""
    reqs, refs = shared_reqs
    with _engine(model, kind, 3, 3 * 192) as engine:
        got, cached = _run(engine, reqs)
        assert got == refs
        hits = engine.stats()["prefix_cache_hits"]
        assert engine.stats()["prefix_cache_queries"] == sum(len(p) for p, _ in reqs)
        assert sum(cached.values()) == hits
        assert (hits > 0) == (kind != "static")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["vmem", "paged"])
def test_greedy_with_prefix_caching_under_eviction(model, shared_reqs, kind):
    """Memory for under one long request per slot: cached prefixes are evicted and found again."""
    reqs, refs = shared_reqs
    with _engine(model, kind, 3, 160) as engine:
        got, _ = _run(engine, reqs, add_every=4)
        assert got == refs
        assert engine.cache.prefix_stats()["evicted_pages"] > 0
        assert engine.stats()["prefix_cache_hits"] > 0


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["vmem", "paged"])
def test_greedy_with_prefix_caching_under_preemption(model, kind):
    """Six long requests on one system prompt, memory for ~1.6 of them: preempted requests find their
    own computed pages (and the system prompt) in the cache when readmitted."""
    rng = np.random.default_rng(9)
    system = rng.integers(0, 256, size=40).tolist()
    reqs = [(system + rng.integers(0, 256, size=int(rng.integers(10, 30))).tolist(), 30) for _ in range(6)]
    refs = [greedy_reference(model, p, n) for p, n in reqs]
    with _engine(model, kind, 4, 180, chunk=32) as engine:
        got, _ = _run(engine, reqs, add_every=6)
        assert got == refs
        assert engine.num_preemptions > 0
        assert engine.stats()["prefix_cache_hits"] >= 3 * 32


@pytest.mark.usefixtures("one_thread")
def test_prefix_caching_off_computes_every_prompt(model, shared_reqs):
    reqs, refs = shared_reqs
    with _engine(model, "paged", 3, 3 * 192, prefix_caching=False) as engine:
        got, cached = _run(engine, reqs)
        assert got == refs and engine.stats()["prefix_cache_hits"] == 0 and not any(cached.values())


# ---- workloads --------------------------------------------------------------------------------

def test_mooncake_loader_reads_the_bundled_trace():
    recs = load_mooncake()
    assert MOONCAKE_CONV_JSONL.parent.joinpath("README.md").read_text().count("Apache")
    assert len(recs) == 12031 and recs[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(recs, recs[1:]))
    assert all(len(r.hash_ids) == -(-r.input_tokens // 512) for r in recs[:500])


def test_mooncake_equal_hash_ids_make_equal_blocks_at_any_scale():
    recs = load_mooncake()[:200]
    for scale, block in ((1 / 32, 16), (1 / 16, 32)):
        reqs = mooncake_requests(recs, scale=scale, seed=5)
        where = {}
        for rec, req in zip(recs, reqs):
            assert len(req.prompt_ids) == max(1, round(rec.input_tokens * scale))
            for i, h in enumerate(rec.hash_ids[:len(req.prompt_ids) // block]):
                blk = req.prompt_ids[i * block:(i + 1) * block]
                assert where.setdefault(h, blk) == blk
        assert len(where) > 100
    a = mooncake_requests(recs[:3], seed=1)
    assert a == mooncake_requests(recs[:3], seed=1) and a != mooncake_requests(recs[:3], seed=2)
    assert a[0].prompt_ids[:16] == a[1].prompt_ids[:16]          # both start with hash id 0
    assert 0.02 < prefix_reuse(mooncake_requests(recs), 16) < 0.5


def test_mooncake_loader_rejects_bad_records(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 1024, "output_length": 3, "hash_ids": [1]}\n')
    with pytest.raises(VmemInvalidArgument):
        load_mooncake(bad)
    bad.write_text('{"timestamp": 0, "input_length": 10}\n')
    with pytest.raises(VmemInvalidArgument):
        load_mooncake(bad)
    with pytest.raises(VmemInvalidArgument):
        load_mooncake(tmp_path / "missing.jsonl")
    with pytest.raises(VmemInvalidArgument):
        mooncake_requests([], scale=2.0)


def test_sessions_extend_their_previous_turn_over_shared_system_prompts():
    reqs = generate_sessions(30, num_system_prompts=3, system_prompt_tokens=64, seed=2)
    assert all(isinstance(r, TokenRequest) for r in reqs)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:]))
    assert len({r.prompt_ids[:64] for r in reqs}) <= 3
    longer = sum(any(o.prompt_ids[:len(r.prompt_ids)] == r.prompt_ids and len(o.prompt_ids) > len(r.prompt_ids)
                     for o in reqs) for r in reqs)
    assert longer > 0                                            # later turns extend earlier ones
    assert prefix_reuse(reqs, 16) > 0.3
    assert generate_sessions(30, seed=2) == generate_sessions(30, seed=2)


# ---- the server: usage.prompt_tokens_details.cached_tokens and vLLM's counters -----------------

@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["vmem", "paged"])
def test_server_reports_cached_tokens_and_prefix_counters(kind):
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from test_server import MODEL, LiveServer
    from vmem.engine.engine import build_engine
    live = LiveServer(build_engine("tiny", kind, max_batch=4, max_seq_len=512, backend="host", page_bytes=4096))
    try:
        prompt = "You are a helpful assistant who answers briefly. " * 3
        first = live.client.completions.create(model=MODEL, prompt=prompt + "Hi?", max_tokens=4, temperature=0)
        second = live.client.completions.create(model=MODEL, prompt=prompt + "Yo?", max_tokens=4, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert 0 < cached <= len(prompt) and cached % 16 == 0
        m = live.wait_idle()
        assert m[("vllm:prefix_cache_hits_total", ())] == cached
        assert m[("vllm:prefix_cache_queries_total", ())] == first.usage.prompt_tokens + second.usage.prompt_tokens
    finally:
        live.stop()


def test_serve_flag_turns_prefix_caching_off():
    from vmem.cli import build_parser
    assert build_parser().parse_args(["serve"]).enable_prefix_caching is True
    assert build_parser().parse_args(["serve", "--no-enable-prefix-caching"]).enable_prefix_caching is False
