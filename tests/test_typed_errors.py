"""Typed errors wherever a user can reach: limits named, no silent truncation or overflow, no
AttributeError / TypeError from deep inside, no native handle shared by a copy (issue 8, item 5)."""
import copy
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from vmem._native import lib
from vmem.allocator.cache import VirtualKVCache
from vmem.allocator.spec import KVCacheSpec
from vmem.errors import VmemClosedError, VmemInvalidArgument, VmemOutOfMemory

SPEC = KVCacheSpec(2, 2, 64, max_batch=4, max_seq_len=256, page_bytes=1 << 16)


def test_pool_beyond_the_pool_limit_names_the_limit_not_out_of_memory(host_backend):
    pools = []
    try:
        with pytest.raises(VmemInvalidArgument, match="%d pools" % lib.VMEM_MAX_POOLS) as info:
            for _ in range(lib.VMEM_MAX_POOLS + 1):
                pools.append(host_backend.create_pool(1 << 16, 0))
        assert not isinstance(info.value, VmemOutOfMemory)
        assert len(pools) <= lib.VMEM_MAX_POOLS
    finally:
        for p in pools:
            p.close()
    with host_backend.create_pool(1 << 16, 1) as p:   # the ids came back
        assert p.num_pages == 1


def test_numpy_int32_spec_fields_do_not_overflow():
    big = KVCacheSpec(np.int32(32), np.int32(8), np.int32(128), max_batch=np.int32(64),
                      max_seq_len=np.int32(1 << 16))
    ref = KVCacheSpec(32, 8, 128, max_batch=64, max_seq_len=1 << 16)
    assert big.reservation_bytes == ref.reservation_bytes > 2**31
    assert type(big.num_layers) is int and big == ref and hash(big) == hash(ref)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bool, torch.int32, torch.int64])
def test_non_floating_dtypes_are_refused(dtype):
    with pytest.raises(VmemInvalidArgument, match="floating"):
        KVCacheSpec(2, 2, 64, dtype=dtype)


def test_float8_dtype_still_accepted():
    assert KVCacheSpec(2, 2, 64, dtype=torch.float8_e4m3fn).itemsize == 1


@pytest.mark.parametrize("pages", [[1.7], [1.0], np.array([2.5]), torch.tensor([1.0]), ["1"], [True]])
def test_float_or_odd_page_indices_are_refused_not_truncated(host_resv, host_pool, pages):
    with pytest.raises(VmemInvalidArgument, match="integer"):
        host_resv.map(pages, host_pool, [2])
    with pytest.raises(VmemInvalidArgument, match="integer"):
        host_resv.map([2], host_pool, pages)
    assert host_resv.mapped_pages == 0


def test_integer_page_indices_of_any_int_dtype_still_work(host_resv, host_pool):
    host_resv.map(np.array([1, 2], dtype=np.int32), host_pool, torch.tensor([3, 4], dtype=torch.int16))
    host_resv.map(np.uint8(7), host_pool, 8)
    assert host_resv.mapping(0, 8).tolist() == [-1, 3, 4, -1, -1, -1, -1, 8]


def test_float_ticket_is_refused_and_the_ticket_kept(host_backend, host_resv, host_pool):
    with host_backend.async_mapper() as m:
        t = m.submit(host_resv, [5], host_pool, [5])
        for bad in (float(t), str(t), None):
            with pytest.raises(VmemInvalidArgument, match="ticket"):
                m.wait(bad)
            with pytest.raises(VmemInvalidArgument, match="ticket"):
                m.done(bad)
        m.wait(np.uint64(t))      # an integer of any kind is fine, and the ticket was not lost
    assert host_resv.mapping(5, 1).tolist() == [5]


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps])
@pytest.mark.parametrize("what", ["reservation", "pool", "mapper"])
def test_copy_and_pickle_of_native_objects_are_refused(host_backend, host_resv, host_pool, how, what):
    with host_backend.async_mapper() as m:
        obj = {"reservation": host_resv, "pool": host_pool, "mapper": m, "backend": host_backend}[what]
        with pytest.raises(VmemInvalidArgument, match="cannot be copied"):
            how(obj)


def test_a_backend_copies_as_itself_and_does_not_pickle(host_backend):
    assert copy.copy(host_backend) is host_backend and copy.deepcopy(host_backend) is host_backend
    with pytest.raises(VmemInvalidArgument, match="cannot be copied"):
        pickle.dumps(host_backend)


def test_copied_mapper_no_longer_double_frees():
    """copy.copy(AsyncMapper) shared the native worker: both copies closed it at exit (double free)."""
    code = textwrap.dedent("""
        import copy
        from vmem.backends import get_backend
        m = get_backend("host").async_mapper()
        try:
            copy.copy(m)
        except Exception as e:
            print(type(e).__name__)
        print("done")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["VmemInvalidArgument", "done"], proc.stderr[-1000:]


def test_backend_none_is_a_typed_error():
    with pytest.raises(VmemInvalidArgument, match="backend"):
        VirtualKVCache(SPEC, backend=None)


@pytest.fixture
def cache():
    c = VirtualKVCache(SPEC, backend="host")
    yield c
    c.close()


def test_attention_with_lists_is_a_typed_error(cache):
    s = cache.alloc_slot()
    cache.step({s: 10})
    q = torch.randn(1, 1, 2, 64, dtype=torch.float16)
    seqlens, slots = torch.tensor([9], dtype=torch.int32), torch.tensor([s], dtype=torch.int32)
    with pytest.raises(VmemInvalidArgument, match="tensor"):
        cache.attention(0, q, q, q, [9], [s])
    with pytest.raises(VmemInvalidArgument, match="tensor"):
        cache.attention(0, q.tolist(), q, q, seqlens, slots)
    with pytest.raises(VmemInvalidArgument):
        cache.attention(0, q, q.tolist(), q.tolist(), seqlens, slots)
    assert cache.attention(0, q, q, q, seqlens, slots).shape == q.shape   # and the right call still works


def test_slot_queries_and_share_prefix_after_close_raise_closed():
    c = VirtualKVCache(SPEC, backend="host")
    a, b = c.alloc_slot(), c.alloc_slot()
    c.step({a: 128})
    c.close()
    with pytest.raises(VmemClosedError):
        c.share_prefix(a, b, 64)
    with pytest.raises(VmemClosedError):
        c.length(a)
    with pytest.raises(VmemClosedError):
        c.num_free_slots
