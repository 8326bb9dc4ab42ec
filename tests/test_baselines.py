"""The three managers behind one interface: paged (vLLM block tables) and static baselines, and vmem."""

import numpy as np
import pytest
import torch

from vmem.allocator import (CACHE_KINDS, KVCacheManager, KVCacheSpec, PagedKVCache, StaticKVCache, make_cache)
from vmem.errors import VmemClosedError, VmemInvalidArgument, VmemOutOfMemory, VmemSlotError


def spec(**kw):
    base = dict(num_layers=2, num_kv_heads=2, head_dim=32, dtype=torch.float32, max_batch=4, max_seq_len=256,
                page_bytes=4096)
    base.update(kw)
    return KVCacheSpec(**base)


def make(kind, s=None, memory_bytes=None, **kw):
    return make_cache(kind, s or spec(), memory_bytes=memory_bytes, backend="host", **kw)


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_same_protocol_for_all_three(kind):
    with make(kind) as c:
        assert isinstance(c, KVCacheManager)
        assert c.kind == kind
        a, b = c.alloc_slot(), c.alloc_slot()
        assert a != b and c.num_free_slots == c.num_slots - 2
        assert c.can_allocate({a: 100, b: 256})
        c.step({a: 100, b: 256})
        c.prefetch({a: 101})
        c.ensure(a, 101)
        c.check_integrity()
        st = c.stats()
        assert st.kind == kind and st.live_slots == 2 and st.live_tokens == 357
        assert st.used_pages + st.reclaimable_pages + st.free_pages == st.total_pages
        assert 0.0 <= st.internal_fragmentation < 1.0
        k, v = c.kv(1)
        assert k.dtype == torch.float32 and k.shape == v.shape
        c.free_slot(a)
        with pytest.raises(VmemSlotError):
            c.free_slot(a)
        with pytest.raises(VmemInvalidArgument):
            c.step({b: 257})
        c.check_integrity()
    with pytest.raises(VmemClosedError):
        c.alloc_slot()


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_needs_beyond_int64_are_typed_errors(kind):
    """The fast path of needs parsing built int64 arrays first: a huge slot or token count raised
    OverflowError instead of the typed error."""
    with make(kind) as c:
        a = c.alloc_slot()
        for call in (lambda: c.step({a: 2**70}), lambda: c.pages_needed({a: 2**64}),
                     lambda: c.can_allocate({a: -2**64}), lambda: c.prefetch({a: 2**63})):
            with pytest.raises(VmemInvalidArgument):
                call()
        with pytest.raises(VmemSlotError):
            c.step({2**70: 1})
        assert c.length(a) == 0


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_kv_views_hold_what_was_written(kind):
    with make(kind) as c:
        s = c.alloc_slot()
        c.step({s: 40})
        k, v = c.kv(0)
        if kind == "paged":
            blocks = c.block_table[s, :3]
            k[blocks[0], 5] = 7.0
            assert float(c.kv(0)[0][blocks[0], 5].sum()) == 7.0 * 2 * 32
        else:
            k[s, 5] = 7.0
            assert float(c.kv(0)[0][s, 5].sum()) == 7.0 * 2 * 32


def test_paged_blocks_and_atomic_out_of_memory():
    s = spec()
    c = PagedKVCache(s, memory_bytes=10 * 16 * s.token_bytes)          # 10 blocks of 16 tokens
    assert c.num_blocks == 10 and c.stats().page_bytes == 16 * s.token_bytes
    a, b = c.alloc_slot(), c.alloc_slot()
    c.step({a: 33})                                                     # 3 blocks
    assert c.pages_needed({a: 48, b: 16}) == 1
    assert c.stats().used_pages == 3
    table = c.block_table.copy()
    with pytest.raises(VmemOutOfMemory) as info:
        c.step({a: 48, b: 120})                                         # 0 + 8 blocks > 7 free
    assert (info.value.needed_pages, info.value.free_pages) == (8, 7)
    assert np.array_equal(c.block_table, table) and c.stats().used_pages == 3
    c.step({a: 48, b: 112})
    assert c.stats().free_pages == 0
    c.free_slot(a)
    assert c.stats().free_pages == 3
    c.check_integrity()


def test_paged_block_table_for_slots():
    c = PagedKVCache(spec())
    a, b = c.alloc_slot(), c.alloc_slot()
    c.step({b: 20, a: 40})
    bt = c.block_table_for(torch.tensor([b, a], dtype=torch.int32))
    assert bt.dtype == torch.int32 and bt.shape == (2, c.max_blocks_per_seq)
    assert len(set(bt[0, :2].tolist()) | set(bt[1, :3].tolist())) == 5


def test_static_memory_buys_whole_slots():
    s = spec(max_batch=8)
    c = StaticKVCache(s, memory_bytes=3 * s.max_seq_len * s.token_bytes + 5)
    assert c.num_slots == 3
    k, _ = c.kv(0)
    assert k.shape == (3, 256, 2, 32)
    slots = [c.alloc_slot() for _ in range(3)]
    with pytest.raises(VmemSlotError):
        c.alloc_slot()
    c.step({slots[0]: 256})
    assert c.stats().used_pages == 3 and c.pages_needed({slots[1]: 256}) == 0
    with pytest.raises(VmemInvalidArgument):
        StaticKVCache(s, memory_bytes=100)


@pytest.mark.parametrize("layout,group", [("HND", 1), ("GROUPED", 2)])
def test_static_follows_the_layout(layout, group):
    s = spec(layout=layout, layer_group_size=group)
    c = StaticKVCache(s)
    k, v = c.kv(1)
    assert k.shape == ((4, 2, 256, 32) if layout == "HND" else (4, 256, 2, 32))
    assert k.stride(-1) == 1


def test_capacity_under_one_budget():
    """Under the same bytes, vmem and paged admit requests by their length, static by max_seq_len."""
    s = spec(max_batch=64, max_seq_len=256, page_bytes=4096)
    budget = 16 * s.max_seq_len * s.token_bytes
    admitted = {}
    for kind in CACHE_KINDS:
        with make(kind, s, memory_bytes=budget) as c:
            n = 0
            while c.num_free_slots:
                slot = c.alloc_slot()
                if not c.can_allocate({slot: 64}):
                    c.free_slot(slot)
                    break
                c.step({slot: 64})
                n += 1
            admitted[kind] = n
    assert admitted["static"] == 16
    assert admitted["paged"] == 64 and admitted["vmem"] == 64


def test_make_cache_rejects_unknown_kind_and_bad_budgets():
    with pytest.raises(VmemInvalidArgument):
        make_cache("dense", spec())
    for kind in ("paged", "static"):
        with pytest.raises(VmemInvalidArgument):
            make(kind, memory_bytes=-1)
    with pytest.raises(VmemInvalidArgument):
        PagedKVCache(spec(), block_size=0)
