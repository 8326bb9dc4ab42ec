"""The managers are safe to call from several threads (one lock around the public methods): real threads
race alloc / step / free on one cache, each writes its mark into its own slot and checks that the mark
survives, and the cache's invariants hold at the end."""

import sys
import threading

import numpy as np
import pytest
import torch

from vmem.allocator import KVCacheSpec, make_cache
from vmem.errors import VmemOutOfMemory, VmemSlotError

SPEC = dict(num_layers=1, num_kv_heads=1, head_dim=64, dtype=torch.float32, max_batch=6, max_seq_len=256,
            page_bytes=4096)


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)          # hand the GIL over as often as CPython allows
    yield
    sys.setswitchinterval(old)


def _slot_rows(cache, slot, num_tokens):
    """The K rows [0, num_tokens) of ``slot``, as a view to write and read back."""
    k, _ = cache.kv(0)
    if cache.kind != "paged":
        return [k[slot, :num_tokens]]
    blocks = cache.block_table[slot, :-(-num_tokens // cache.block_size)].tolist()
    return [k[b] for b in blocks]


def _worker(cache, mark, rounds, seed, errors):
    rng = np.random.default_rng(seed)
    try:
        for _ in range(rounds):
            try:
                slot = cache.alloc_slot()
            except VmemSlotError:
                continue
            length = 0
            for _ in range(int(rng.integers(1, 5))):
                length = min(length + int(rng.integers(1, 80)), 256)
                try:
                    cache.step({slot: length})
                except VmemOutOfMemory:
                    break
                for rows in _slot_rows(cache, slot, length):
                    rows.fill_(mark)
                for rows in _slot_rows(cache, slot, cache.length(slot)):
                    if not bool((rows == mark).all()):
                        errors.append("thread %d: slot %d lost its data" % (mark, slot))
                        return
            cache.free_slot(slot)
    except Exception as exc:                 # anything but the typed errors above is a race showing
        errors.append("thread %d: %r" % (mark, exc))


@pytest.mark.parametrize("kind,options", [
    ("vmem", dict(reclaim="deferred")), ("vmem", dict(reclaim="eager")), ("vmem", dict(async_map=True)),
    ("paged", {}), ("static", {})])
def test_threads_racing_one_cache_keep_their_data_and_the_invariants(kind, options, fast_switching):
    spec = KVCacheSpec(**SPEC)
    memory = 3 * spec.max_seq_len * spec.token_bytes        # half the slots at full length
    with make_cache(kind, spec, memory_bytes=memory, backend="host", **options) as cache:
        errors = []
        threads = [threading.Thread(target=_worker, args=(cache, mark, 60, mark, errors)) for mark in (1, 2, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        cache.check_integrity()
        assert cache.num_free_slots == cache.num_slots
