"""VirtualKVCache on the real host backend: mapping, reclamation, atomicity, OS accounting, typed errors."""

import numpy as np
import pytest
import torch

from vmem.allocator import KVCacheSpec, VirtualKVCache, make_cache
from vmem.backends import get_backend
from vmem.errors import (VmemClosedError, VmemDriverError, VmemError, VmemInvalidArgument, VmemMapLimitError,
                         VmemOutOfMemory, VmemSlotError)

LAYOUTS = [("NHD", 1), ("HND", 1), ("GROUPED", 2)]


def small_spec(layout="NHD", group=1, **kw):
    base = dict(num_layers=2, num_kv_heads=2, head_dim=32, dtype=torch.float32, max_batch=4, max_seq_len=256,
                page_bytes=4096, layout=layout, layer_group_size=group)
    base.update(kw)
    return KVCacheSpec(**base)


def cache(spec=None, pages=None, **kw):
    spec = spec or small_spec()
    memory = None if pages is None else pages * spec.page_bytes
    return VirtualKVCache(spec, memory_bytes=memory, backend="host", **kw)


def fill(c, slot, num_tokens, seed):
    """Write seeded values into tokens [0, num_tokens) of every layer's K and V of a slot."""
    g = torch.Generator().manual_seed(seed)
    for layer in range(c.spec.num_layers):
        for t in c.kv(layer):
            view = t[slot, :, :num_tokens] if c.spec.layout == "HND" else t[slot, :num_tokens]
            view.copy_(torch.randn(view.shape, generator=g))


def checksum(c, slot, num_tokens):
    total = []
    for layer in range(c.spec.num_layers):
        for t in c.kv(layer):
            view = t[slot, :, :num_tokens] if c.spec.layout == "HND" else t[slot, :num_tokens]
            total.append(float(view.double().sum()))
    return total


def snapshot(c):
    s = c.stats()
    return (s.used_pages, s.mapped_pages, s.reclaimable_pages, s.free_pages, s.live_tokens,
            c._table.phys.copy().tobytes(), c.reservation.mapping().tobytes(), c.pool.resident_bytes())


@pytest.mark.parametrize("layout,group", LAYOUTS)
def test_data_survives_other_requests(layout, group):
    """Checksums of one request survive others' allocation, growth, freeing and reclamation."""
    with cache(small_spec(layout, group), pages=120) as c:
        keep = c.alloc_slot()
        c.step({keep: 150})
        fill(c, keep, 150, seed=1)
        want = checksum(c, keep, 150)
        rng = np.random.default_rng(0)
        others = {}
        for _ in range(60):
            if others and (rng.random() < 0.4 or c.num_free_slots == 0):
                c.free_slot(others.pop(int(rng.choice(list(others)))))
            else:
                s = c.alloc_slot()
                n = int(rng.integers(1, 256))
                if c.can_allocate({s: n}):
                    c.step({s: n})
                    fill(c, s, n, seed=int(rng.integers(1 << 30)))
                    others[s] = s
                else:
                    c.free_slot(s)
            c.check_integrity()
        assert c.stats().reclaimed_pages > 0         # the pool ran dry and idle slots gave pages back
        assert checksum(c, keep, 150) == want


def test_step_is_one_map_call_for_the_whole_batch():
    with cache() as c:
        slots = [c.alloc_slot() for _ in range(4)]
        c.step({s: 100 + 20 * i for i, s in enumerate(slots)})
        s = c.stats()
        assert s.map_calls == 1
        assert s.pages_mapped == sum(c.spec.pages_for_tokens(100 + 20 * i) for i in range(4))
        assert c.reservation.stats()["map_calls"] == 1
        c.check_integrity()


def test_deferred_reuse_needs_no_map_call():
    with cache() as c:
        s = c.alloc_slot()
        c.step({s: 200})
        calls = c.stats().map_calls
        c.free_slot(s)
        assert c.stats().reclaimable_pages == c.spec.pages_for_tokens(200)
        s2 = c.alloc_slot()
        assert s2 == s                               # the slot with mapped pages is handed out first
        c.step({s2: 150})
        st = c.stats()
        assert st.map_calls == calls
        assert st.reclaimable_pages == c.spec.pages_for_tokens(200) - c.spec.pages_for_tokens(150)
        assert st.reused_pages == c.spec.pages_for_tokens(150)
        c.check_integrity()


def test_alloc_hint_picks_the_best_fitting_mapped_slot():
    with cache() as c:
        a, b = c.alloc_slot(), c.alloc_slot()
        c.step({a: 200, b: 40})
        c.free_slot(a), c.free_slot(b)
        assert c.alloc_slot(num_tokens=30) == b      # smallest mapped slot that covers 30 tokens
        assert c.alloc_slot(num_tokens=10**6) == a    # a hint is advisory: clamped to max_seq_len
        with pytest.raises(VmemInvalidArgument):
            c.alloc_slot(num_tokens="long")


def test_eager_reclamation_returns_memory_at_free():
    with cache(reclaim="eager") as c:
        s = c.alloc_slot()
        c.step({s: 200})
        assert c.pool.resident_bytes() == c.stats().mapped_bytes > 0
        c.free_slot(s)
        st = c.stats()
        assert st.mapped_pages == 0 and st.reclaimable_pages == 0
        assert c.pool.resident_bytes() == 0
        c.check_integrity()


def test_os_backing_agrees_with_statistics():
    with cache(pages=100) as c:
        slots = [c.alloc_slot() for _ in range(3)]
        c.step({slots[0]: 100, slots[1]: 30, slots[2]: 200})
        assert c.pool.resident_bytes() == c.stats().mapped_bytes
        c.free_slot(slots[2])
        assert c.pool.resident_bytes() == c.stats().mapped_bytes        # deferred: still mapped
        assert c.reclaim_idle() == c.spec.pages_for_tokens(200)
        st = c.stats()
        assert c.pool.resident_bytes() == st.mapped_bytes == st.used_bytes
        assert c.reservation.mapped_pages == st.mapped_pages
        c.check_integrity()


def test_pool_dry_takes_pages_from_idle_slots_in_lru_order():
    spec = small_spec()                              # 16 tokens per page, 4 rows per slot
    with cache(spec, pages=4 * spec.pages_for_tokens(64)) as c:
        a, b, d, f = (c.alloc_slot() for _ in range(4))
        c.step({a: 64, b: 64, d: 64, f: 64})         # the pool is full
        c.free_slot(b), c.free_slot(d), c.free_slot(a)
        e = c.alloc_slot()
        assert e == a                                 # ties on mapped pages go to the lowest slot
        c.step({e: 64 + 16})                          # one column more: taken from b, idle the longest
        st = c.stats()
        assert st.reclaimed_pages == spec.rows_per_slot and st.free_pages == 0
        mapping = c.reservation.mapping()
        assert np.all(mapping[spec.slot_virtual_pages(b, 3, 4)] == -1)
        assert np.all(mapping[spec.slot_virtual_pages(b, 0, 3)] >= 0)
        assert np.all(mapping[spec.slot_virtual_pages(d, 0, 4)] >= 0)
        c.check_integrity()


def test_live_slots_give_back_columns_beyond_their_length():
    """A short request in a slot a long one left behind holds its tail pages only until the pool runs dry."""
    spec = small_spec()
    with cache(spec, pages=2 * spec.pages_for_tokens(128)) as c:
        a = c.alloc_slot()
        c.step({a: 256})                              # the whole pool
        c.free_slot(a)
        a = c.alloc_slot()
        c.step({a: 16})                               # inherits 16 columns, needs 1
        st = c.stats()
        assert st.used_pages == spec.pages_for_tokens(16)
        assert st.reclaimable_pages == spec.pages_for_tokens(256) - spec.pages_for_tokens(16)
        b = c.alloc_slot()
        assert c.can_allocate({a: 32, b: 224})
        c.step({a: 32, b: 224})
        assert c.stats().reclaimed_pages == spec.pages_for_tokens(224)
        assert not c.can_allocate({a: 48})
        c.check_integrity()


def test_out_of_memory_is_atomic_and_says_how_much():
    spec = small_spec()
    with cache(spec, pages=40) as c:
        a, b = c.alloc_slot(), c.alloc_slot()
        c.step({a: 64})
        before = snapshot(c)
        assert not c.can_allocate({a: 64, b: 256})
        with pytest.raises(VmemOutOfMemory) as info:
            c.step({a: 96, b: 256})
        assert info.value.needed_pages == c.pages_needed({a: 96, b: 256}) == spec.pages_for_tokens(256) + 8
        assert info.value.free_pages == 40 - spec.pages_for_tokens(64)
        assert isinstance(info.value, MemoryError)
        assert snapshot(c) == before
        c.check_integrity()
        c.step({a: 96, b: 64})                        # what fits still works


@pytest.mark.parametrize("nth", [1, 2, 3, 5, 8])
def test_native_failure_mid_step_rolls_back(nth):
    """A map (or reclaim unmap) failing at its nth OS call leaves every count and byte as it was."""
    spec = small_spec()
    with cache(spec, pages=48) as c:
        keep, idle = c.alloc_slot(), c.alloc_slot()
        c.step({keep: 64, idle: 128})
        fill(c, keep, 64, seed=3)
        want = checksum(c, keep, 64)
        c.free_slot(idle)
        grow = c.alloc_slot(num_tokens=0)
        if grow == idle:
            grow = c.alloc_slot()
        before = snapshot(c)
        c.reservation.inject_fault(nth)
        try:
            c.step({keep: 96, grow: 96})              # needs pages from the idle slot: unmap + map
        except VmemDriverError:
            assert snapshot(c) == before
        finally:
            c.reservation.inject_fault(0)
        c.check_integrity()
        assert checksum(c, keep, 64) == want
        c.step({keep: 96, grow: 96})
        c.check_integrity()


def test_failed_step_gives_back_the_inherited_columns_it_reclaimed():
    """A failed step mapped a live slot's reclaimed tail back but left it marked as not inherited, so the
    next growth into it was not counted as reuse (state changed by a step that raised)."""
    spec = small_spec()                              # 16 tokens per page
    rows = spec.rows_per_slot
    with cache(spec, pages=spec.pages_for_tokens(128) + rows) as c:
        a = c.alloc_slot()
        c.step({a: 128})
        c.free_slot(a)
        assert c.alloc_slot(num_tokens=128) == a     # finds its 8 columns still mapped
        c.step({a: 16})                               # 7 tail columns are reclaimable
        b = c.alloc_slot()
        before = snapshot(c), dict(c.counters)
        c.reservation.inject_fault(rows + 1)          # ops 1..rows unmap a's tail (a run per row), a map fails
        try:
            with pytest.raises(VmemDriverError):
                c.step({b: 64})
        finally:
            c.reservation.inject_fault(0)
        assert snapshot(c) == before[0]
        c.check_integrity()
        c.step({a: 128})                              # no map call: every column is a's own again
        assert c.counters["reused_pages"] == spec.pages_for_tokens(128)


def test_failed_map_leaves_no_memory_behind():
    """Runs mapped (and populated) before the failing one are rolled back and their memory trimmed."""
    with cache(pages=12) as c:
        s = c.alloc_slot()
        c.reservation.inject_fault(2)                 # the second of four runs fails
        with pytest.raises(VmemDriverError):
            c.step({s: 1})
        c.reservation.inject_fault(0)
        assert c.pool.resident_bytes() == 0


def test_map_budget_error_is_typed_and_atomic():
    backend = get_backend("host")
    with cache(small_spec(max_batch=4)) as c:
        slots = [c.alloc_slot() for _ in range(4)]
        c.step({slots[0]: 32})
        before = snapshot(c)
        used = backend.info()["mappings_used"]
        backend.set_map_budget(used + 2)
        try:
            with pytest.raises(VmemMapLimitError, match="max_map_count"):
                c.step({s: 100 for s in slots})
        finally:
            backend.set_map_budget(1 << 40)           # clamped back to the budget computed at open
        assert snapshot(c) == before
        c.check_integrity()


def test_async_prefetch_maps_the_next_step_ahead():
    with cache(async_map=True) as c:
        a, b = c.alloc_slot(), c.alloc_slot()
        c.step({a: 10, b: 10})
        for n in range(11, 200, 7):
            c.prefetch({a: n + 7, b: n + 7})
            fill(c, a, n, seed=n)                     # the "forward" runs while the worker maps
            c.step({a: n + 7, b: n + 7})
        counters = c.counters
        assert counters["prefetch_pages"] > 0 and counters["prefetch_failures"] == 0
        assert c.stats().pages_mapped == counters["pages_mapped"]
        c.check_integrity()


def test_failed_prefetch_corrupts_nothing():
    with cache(async_map=True) as c:
        a = c.alloc_slot()
        c.step({a: 10})
        fill(c, a, 10, seed=5)
        want = checksum(c, a, 10)
        c.reservation.inject_fault(1)
        c.prefetch({a: 120})
        c.check_integrity()                           # settles the failed ticket and undoes its plan
        c.reservation.inject_fault(0)
        assert c.counters["prefetch_failures"] == 1
        c.step({a: 120})
        assert checksum(c, a, 10) == want
        c.check_integrity()


@pytest.mark.parametrize("nth", [0, 1])
def test_prefetch_whose_map_submit_fails_settles_its_queued_unmap(monkeypatch, nth):
    """prefetch queued the idle slot's unmap, then the map submit raised: the unmap ticket was never
    waited, and when that unmap failed (nth=1) the page table said unmapped what the backend still held."""
    spec = small_spec()
    with cache(spec, pages=spec.pages_for_tokens(128) + spec.pages_for_tokens(32), async_map=True) as c:
        idle, a = c.alloc_slot(), c.alloc_slot()
        c.step({idle: 128, a: 32})
        c.free_slot(idle)
        before = snapshot(c)

        def no_memory(*args, **kwargs):
            raise VmemOutOfMemory("submit: no memory for the job", op="submit")

        monkeypatch.setattr(c._prefetcher.mapper, "submit", no_memory)
        c.reservation.inject_fault(nth)
        with pytest.raises(VmemOutOfMemory):
            c.prefetch({a: 96})
        c.reservation.inject_fault(0)
        assert c._prefetcher.mapper.pending == 0 and not c._prefetcher.mapper._jobs   # every ticket waited
        c.check_integrity()
        if nth:
            assert snapshot(c) == before                       # the failed unmap left the idle slot whole
        monkeypatch.undo()
        c.step({a: 96})
        c.check_integrity()


@pytest.mark.parametrize("nth", [0, 1, 2])
def test_prefetch_takes_pages_from_idle_slots_on_the_worker(nth):
    """Pool full of an idle slot's pages: prefetch queues the unmap and the map; a failure of either
    (nth OS call, 1 = the unmap) is undone when the ticket settles."""
    spec = small_spec()
    with cache(spec, pages=spec.pages_for_tokens(128) + spec.pages_for_tokens(32), async_map=True) as c:
        idle, a = c.alloc_slot(), c.alloc_slot()
        c.step({idle: 128, a: 32})
        fill(c, a, 32, seed=9)
        want = checksum(c, a, 32)
        c.free_slot(idle)
        before = snapshot(c)
        c.reservation.inject_fault(nth)
        c.prefetch({a: 96})
        c.check_integrity()                           # settles both tickets
        c.reservation.inject_fault(0)
        counters = c.counters
        if nth:
            assert counters["prefetch_failures"] == 1
            if nth == 1:                              # the unmap failed: the idle slot keeps its pages
                assert snapshot(c)[:5] == before[:5]
        else:
            assert counters["prefetch_failures"] == 0
            assert c.stats().pages_mapped == spec.pages_for_tokens(96) - spec.pages_for_tokens(32) + \
                spec.pages_for_tokens(128) + spec.pages_for_tokens(32)
        maps = c.stats().map_calls
        c.step({a: 96})
        assert c.stats().map_calls == maps + (1 if nth else 0)
        assert checksum(c, a, 32) == want
        assert c.pool.resident_bytes() == c.stats().mapped_bytes
        c.check_integrity()


def test_shared_prefix_maps_the_same_pages():
    spec = small_spec()                              # 16 tokens per page
    with cache(spec, pages=64) as c:
        src, other = c.alloc_slot(), c.alloc_slot()
        c.step({src: 100, other: 20})
        fill(c, src, 100, seed=4)
        resident = c.pool.resident_bytes()
        dst = c.alloc_slot()
        assert c.share_prefix(src, dst, 70) == 64     # whole pages only
        assert c.length(dst) == 64
        assert c.pool.resident_bytes() == resident    # no new memory: the pages are mapped twice
        for layer in range(spec.num_layers):
            for ks, kd in zip(c.kv(layer), c.kv(layer)):
                assert torch.equal(ks[src, :64], kd[dst, :64])
        c.check_integrity()
        st = c.stats()
        assert st.mapped_pages == spec.pages_for_tokens(100) + spec.pages_for_tokens(20)
        want = checksum(c, src, 100)
        c.step({dst: 90})                             # dst continues in pages of its own
        fill(c, dst, 90, seed=5)                      # rewrites [0, 64) with other values...
        assert checksum(c, src, 100) != want          # ...which src sees: the pages are shared
        fill(c, src, 100, seed=4)
        fill_tail = checksum(c, dst, 90)
        with pytest.raises(VmemInvalidArgument, match="shares"):
            c.step({src: 10})                         # may not shrink below the shared pages
        c.free_slot(src)
        c.check_integrity()
        assert checksum(c, dst, 90) == fill_tail      # dst keeps the pages after src is gone
        c.free_slot(dst)                              # a slot with shared pages unmaps them at free
        assert c.stats().reclaimable_pages == 0 and c.stats().mapped_pages == spec.pages_for_tokens(20)
        assert c.pool.resident_bytes() == c.stats().mapped_bytes
        c.check_integrity()


def test_slots_sharing_their_last_page_grow_into_different_pages():
    """Both rows ended on the same (shared) pool page, so both 'continued in place' onto the same next
    page: two live requests wrote one physical page."""
    spec = small_spec()                              # 16 tokens per page
    with cache(spec, pages=64) as c:
        src = c.alloc_slot()
        c.step({src: 64})
        dst = c.alloc_slot()
        assert c.share_prefix(src, dst, 64) == 64   # src's last page is shared too
        c.step({src: 80, dst: 80})
        c.check_integrity()
        fill(c, src, 80, seed=1)
        want = checksum(c, src, 80)
        fill(c, dst, 80, seed=2)                    # rewrites the shared [0, 64) and dst's own [64, 80)
        fill(c, src, 80, seed=1)
        assert checksum(c, src, 80) == want
        for layer in range(spec.num_layers):
            for t in c.kv(layer):
                assert not torch.equal(t[src, 64:80], t[dst, 64:80])


def test_shared_prefix_bad_input():
    with cache() as c:
        a, b = c.alloc_slot(), c.alloc_slot()
        c.step({a: 50, b: 5})
        for args in [(a, a, 10), (a, b, 10), (b, c.alloc_slot(), 6)]:
            with pytest.raises(VmemInvalidArgument):
                c.share_prefix(*args)
        with pytest.raises(VmemSlotError):
            c.share_prefix(a, 3, 10)
    with cache(small_spec(head_dim=24)) as c:          # 192-byte tokens straddle 4 KiB pages
        a, b = c.alloc_slot(), c.alloc_slot()
        c.step({a: 50})
        with pytest.raises(VmemInvalidArgument, match="whole tokens"):
            c.share_prefix(a, b, 40)


def test_interleaved_growth_keeps_mappings_merged():
    spec = small_spec(max_batch=8, max_seq_len=1024, layout="HND")
    with cache(spec) as c:
        slots = [c.alloc_slot() for _ in range(8)]
        for n in range(16, 1025, 16):
            c.step({s: n for s in slots})
        rows = spec.num_planes * spec.max_batch * spec.rows_per_plane
        assert c.stats().os_mappings <= rows + 1      # one mapping per row (plus no gap: all full)
        c.check_integrity()


@pytest.mark.parametrize("layout,group", LAYOUTS)
def test_unmapped_tail_reads_zero_and_views_are_zero_copy(layout, group):
    with cache(small_spec(layout, group)) as c:
        s = c.alloc_slot()
        c.step({s: 40})
        k, v = c.kv(1)
        assert k.data_ptr() >= c.reservation.address
        assert k.data_ptr() + 1 < c.reservation.address + c.reservation.num_bytes
        tail = k[s, :, 200:] if layout == "HND" else k[s, 200:]
        assert float(tail.abs().sum()) == 0.0         # host: unmapped pages read as zeros


def test_bad_input_raises_typed_errors_and_changes_nothing():
    c = cache(small_spec(max_batch=2))
    a = c.alloc_slot()
    c.step({a: 10})
    before = snapshot(c)
    with pytest.raises(VmemInvalidArgument):
        c.step({a: 257})                              # over max_seq_len
    with pytest.raises(VmemInvalidArgument):
        c.step({a: -1})
    with pytest.raises(VmemInvalidArgument):
        c.step([(a, 3)])
    with pytest.raises(VmemSlotError):
        c.step({7: 3})                                # no such slot
    with pytest.raises(VmemSlotError):
        c.step({1: 3})                                # never allocated
    b = c.alloc_slot()
    with pytest.raises(VmemSlotError):
        c.alloc_slot()                                # more slots than max_batch
    c.free_slot(b)
    with pytest.raises(VmemSlotError):
        c.free_slot(b)                                # double free
    with pytest.raises(VmemSlotError):
        c.step({b: 3})                                # freed slot
    with pytest.raises(VmemInvalidArgument):
        c.kv(2)
    assert isinstance(VmemSlotError("x"), KeyError)
    assert snapshot(c) == before
    c.check_integrity()
    c.close()
    c.close()                                         # idempotent
    for call in (lambda: c.step({a: 1}), c.alloc_slot, lambda: c.kv(0), c.check_integrity,
                 lambda: c.free_slot(a), lambda: c.prefetch({a: 1})):
        with pytest.raises(VmemClosedError):
            call()


def test_close_on_cuda_waits_for_kernels_before_unmapping(monkeypatch):
    """close() released the reservation (cuMemUnmap of every page) without the device synchronisation
    every other unmap does first, so a kernel still reading the cache could fault."""
    events = []
    with cache() as c:
        a = c.alloc_slot()
        c.step({a: 40})
        c.device = torch.device("cuda", 0)            # pretend: the host backend does the mapping
        monkeypatch.setattr(torch.cuda, "synchronize",
                            lambda device=None: events.append(("sync", c.reservation.closed)))
        real_close = c.reservation.close
        monkeypatch.setattr(c.reservation, "close", lambda: (events.append(("close", None)), real_close()))
        c.close()
    assert events and events[0] == ("sync", False) and ("close", None) in events


def test_failed_construction_releases_the_reservation_and_the_pool(monkeypatch):
    """A failure after reserve() and create_pool() (here: no worker thread) left both open until GC."""
    backend = get_backend("host")
    made = []
    for name in ("reserve", "create_pool"):
        real = getattr(type(backend), name)
        monkeypatch.setattr(type(backend), name,
                            lambda self, *a, _real=real, **k: made.append(_real(self, *a, **k)) or made[-1])

    def no_thread(self):
        raise VmemError("no worker thread")

    monkeypatch.setattr(type(backend), "async_mapper", no_thread)
    with pytest.raises(VmemError, match="no worker"):
        cache(async_map=True)
    assert len(made) == 2 and all(m.closed for m in made)


def test_pool_memory_held_from_creation_counts_as_resident(monkeypatch):
    """The cuda pool creates every handle with the pool (and a hugetlb memfd is fallocated whole), so the
    backend reports all pool pages resident from the start; the page table marked only mapped ones, and
    check_integrity failed as soon as one pool page had never been mapped. Emulated on the host: the
    pool's pages are given memory (mapped, written, unmapped) before the cache sees it."""
    backend = get_backend("host")
    real = type(backend).create_pool

    def prefaulted_pool(self, page_bytes, num_pages, max_pages=None):
        pool = real(self, page_bytes, num_pages, max_pages)
        with self.reserve(num_pages * page_bytes, page_bytes) as scratch:
            scratch.map(np.arange(num_pages), pool, np.arange(num_pages))
            scratch.tensor(torch.uint8, (num_pages * page_bytes,)).fill_(1)
            scratch.unmap(np.arange(num_pages))
        assert pool.info()["backed_pages"] == num_pages
        return pool

    monkeypatch.setattr(type(backend), "create_pool", prefaulted_pool)
    spec = small_spec()
    with cache(spec, pages=64) as c:
        c.check_integrity()
        a = c.alloc_slot()
        c.step({a: 40})
        c.check_integrity()
        c.free_slot(a)
        assert c.reclaim_idle() == spec.pages_for_tokens(40)   # host: trimmed, no longer resident
        c.check_integrity()


def test_bad_construction_arguments():
    with pytest.raises(VmemInvalidArgument):
        cache(reclaim="lazy")
    with pytest.raises(VmemInvalidArgument):
        cache(pages=1)                                # less than one column
    with pytest.raises(VmemInvalidArgument):
        cache(small_spec(page_bytes=2048))           # not a multiple of the host granularity
    with pytest.raises(VmemInvalidArgument):
        make_cache("fancy", small_spec())
    with pytest.raises(VmemError):
        cache(reclaim_policy="random")


def test_reservation_holds_every_plane_in_one_range():
    spec = small_spec(layout="HND")
    with cache(spec) as c:
        assert c.reservation.num_bytes == spec.reservation_bytes
        for layer in range(spec.num_layers):
            k, v = c.kv(layer)
            plane, _ = spec.layer_plane(layer)
            assert k.data_ptr() == c.reservation.address + spec.plane_offset_bytes(plane)
            assert v.data_ptr() == c.reservation.address + spec.plane_offset_bytes(plane + 1)
