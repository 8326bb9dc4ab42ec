"""The oracle: greedy decoding through every cache gives exactly the tokens of a full recompute
without any cache (Model.forward_full), across slot reuse, reclamation, chunked prefill and preemption."""

import numpy as np
import pytest
import torch

from conftest import greedy_reference
from vmem.allocator import KVCacheSpec, make_cache
from vmem.engine.engine import Engine, Request, SamplingParams
from vmem.engine.model import Model, ModelConfig

KINDS = ["vmem", "paged", "static"]

pytestmark = pytest.mark.usefixtures("one_thread")


def make_spec(model, max_batch, max_seq_len=128, page_bytes=4096):
    c = model.config
    return KVCacheSpec.for_model(c, max_batch=max_batch, max_seq_len=max_seq_len, page_bytes=page_bytes)


def token_bytes(spec):
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * spec.dtype.itemsize


def workload(num_requests, seed, max_prompt=60, max_new=16):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, size=int(rng.integers(1, max_prompt + 1))).tolist(), int(rng.integers(1, max_new + 1)))
            for _ in range(num_requests)]


def run(engine, reqs, *, add_every=1):
    """Add requests a few at a time (so prefills and decodes mix) and collect the tokens streamed out."""
    got = {f"r{i}": [] for i in range(len(reqs))}
    reasons = {}
    pending = list(enumerate(reqs))
    while pending or engine.has_work():
        for i, (prompt, n) in pending[:add_every]:
            engine.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=n, ignore_eos=True)))
        pending = pending[add_every:]
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
            assert out.num_output_tokens == len(got[out.request_id])
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        engine.cache.check_integrity()
    return got, reasons


@pytest.fixture(scope="module")
def reqs_and_refs(model):
    reqs = workload(12, seed=1)
    return reqs, [greedy_reference(model, p, n) for p, n in reqs]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_full_recompute_with_slot_reuse(model, reqs_and_refs, kind):
    reqs, refs = reqs_and_refs
    spec = make_spec(model, max_batch=4)
    cache = make_cache(kind, spec, memory_bytes=4 * spec.max_seq_len * token_bytes(spec))
    engine = Engine(model, cache, max_num_batched_tokens=64, prefill_chunk_tokens=24)
    try:
        got, reasons = run(engine, reqs, add_every=2)
        assert [got[f"r{i}"] for i in range(len(reqs))] == refs
        assert set(reasons.values()) == {"length"}
        assert cache.stats().live_slots == 0
    finally:
        engine.close()


@pytest.mark.parametrize("reclaim", ["deferred", "eager"])
def test_vmem_reclamation_modes_and_async_prefetch(model, reqs_and_refs, reclaim):
    reqs, refs = reqs_and_refs
    spec = make_spec(model, max_batch=3)
    cache = make_cache("vmem", spec, memory_bytes=3 * spec.max_seq_len * token_bytes(spec), reclaim=reclaim,
                       async_map=True)
    engine = Engine(model, cache, max_num_batched_tokens=48, prefill_chunk_tokens=16, async_map=True)
    try:
        got, _ = run(engine, reqs, add_every=3)
        assert [got[f"r{i}"] for i in range(len(reqs))] == refs
        s = cache.stats()
        if reclaim == "deferred":
            assert s.reused_pages > 0          # later requests reused pages left mapped in their slot
        else:                                  # no idle slot keeps pages; the prefix index may
            assert s.reclaimable_pages == cache.prefix_stats()["cached_pages"]
    finally:
        engine.close()


@pytest.mark.parametrize("kind", ["vmem", "paged"])
def test_greedy_matches_under_preemption(model, kind):
    """A budget of about 1.5 long sequences for 6 long requests forces recompute preemption."""
    reqs = workload(6, seed=5, max_prompt=70, max_new=40)
    reqs = [(p + [7] * max(0, 50 - len(p)), max(n, 30)) for p, n in reqs]
    refs = [greedy_reference(model, p, n) for p, n in reqs]
    spec = make_spec(model, max_batch=4)
    cache = make_cache(kind, spec, memory_bytes=int(1.6 * 112 * token_bytes(spec)))
    engine = Engine(model, cache, max_num_batched_tokens=128, prefill_chunk_tokens=32)
    try:
        got, reasons = run(engine, reqs, add_every=6)
        assert engine.num_preemptions > 0
        assert [got[f"r{i}"] for i in range(len(reqs))] == refs
        assert set(reasons.values()) == {"length"}
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_full_recompute_on_cuda(kind):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = Model(ModelConfig.preset("tiny", seed=0)).to("cuda")
    reqs = workload(8, seed=11)
    refs = [greedy_reference(model, p, n) for p, n in reqs]
    spec = make_spec(model, max_batch=3)
    cache = make_cache(kind, spec, memory_bytes=3 * spec.max_seq_len * token_bytes(spec), backend="cuda",
                       device="cuda")
    engine = Engine(model, cache, max_num_batched_tokens=48, prefill_chunk_tokens=16, async_map=True)
    try:
        got, _ = run(engine, reqs, add_every=3)
        assert [got[f"r{i}"] for i in range(len(reqs))] == refs
    finally:
        engine.close()
