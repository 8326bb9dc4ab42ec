"""The host backend against the real kernel: data movement, zeros, faults, rollback, accounting, limits."""
import gc
import os
import gc
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import vmas_in
from vmem._native import lib
from vmem.errors import (VmemBusyError, VmemClosedError, VmemDriverError, VmemInvalidArgument,
                         VmemMapLimitError, VmemOutOfMemory)

PB = 64 << 10  # page bytes used by the fixtures


@pytest.fixture(autouse=True)
def _collect_earlier_garbage():
    """The map budget is process-wide, and a closed reservation stays mapped until its last view is
    collected: collect earlier tests' garbage first, so that no collection inside a test moves
    mappings_used between two reads (it did, after the state-machine tests, in the full suite)."""
    gc.collect()


def process_vmas() -> int:
    return int(lib.vmem_count_process_mappings())


def page_view(resv, page, dtype=torch.int64):
    n = resv.page_bytes // torch.empty((), dtype=dtype).element_size()
    return resv.tensor(dtype, (n,), offset_bytes=page * resv.page_bytes)


def test_write_visible_through_second_mapping(host_backend, host_resv, host_pool):
    other = host_backend.reserve(4 * PB, PB)
    try:
        host_resv.map([3], host_pool, [9])
        other.map([1], host_pool, [9])
        host_resv.map([7], host_pool, [9])  # the same page twice in one reservation too
        a, b, c = page_view(host_resv, 3), page_view(other, 1), page_view(host_resv, 7)
        a.copy_(torch.arange(a.numel()))
        assert torch.equal(b, a) and torch.equal(c, a)
        assert host_pool.info()["mappings"] == 3 and host_pool.info()["mapped_pages"] == 1
    finally:
        other.close()


def test_remap_moves_data_without_copy(host_resv, host_pool):
    host_resv.map([0, 1], host_pool, [4, 5])
    src = host_resv.tensor(torch.float32, (2 * PB // 4,))
    src.copy_(torch.randn(src.numel()))
    expected = src.clone()
    host_resv.unmap([0, 1])
    host_resv.map([20, 21], host_pool, [4, 5])
    moved = host_resv.tensor(torch.float32, (2 * PB // 4,), offset_bytes=20 * PB)
    assert torch.equal(moved, expected)
    assert int(src.abs().sum()) == 0  # the old place reads zeros again
    assert host_resv.stats()["map_ops"] == 2  # one mmap per contiguous run


def test_unmapped_reads_are_zeros(host_resv):
    t = host_resv.tensor(torch.uint8, (host_resv.num_bytes,))
    assert int(t[:: 4096].sum()) == 0 and int(t[-PB:].sum()) == 0
    assert host_resv.mapped_pages == 0


_CHILD = textwrap.dedent("""
    import ctypes, sys
    from vmem.backends import get_backend
    b = get_backend("host")
    r = b.reserve(1 << 20, 4096)
    p = b.create_pool(4096, 4)
    r.map([0], p, [0])
    ctypes.memset(r.address, 1, 4096)            # mapped: fine
    if sys.argv[1] == "after_unmap":
        r.unmap([0])
        addr = r.address
    else:
        addr = r.address + 8 * 4096
    print("about to write", flush=True)
    ctypes.memset(addr, 1, 1)
    print("survived", flush=True)
""")


@pytest.mark.parametrize("case", ["never_mapped", "after_unmap"])
def test_write_to_unmapped_page_segfaults(case):
    p = subprocess.run([sys.executable, "-c", _CHILD, case], capture_output=True, text=True, timeout=60)
    assert "about to write" in p.stdout
    assert "survived" not in p.stdout
    if os.environ.get("VMEM_SANITIZE") == "asan":   # ASan reports the SEGV (.ci/sanitize) and exits 66
        assert p.returncode == 66 and "DEADLYSIGNAL" in p.stderr, (p.returncode, p.stderr[-500:])
    else:
        assert p.returncode == -signal.SIGSEGV, (p.returncode, p.stderr[-500:])


def _scattered(n, stride=2):
    return np.arange(n, dtype=np.int64) * stride


@pytest.mark.parametrize("where", ["reservation", "pool"])
def test_injected_map_failure_rolls_back(host_backend, host_resv, host_pool, where):
    before_used = host_backend.info()["mappings_used"]
    virt, phys = _scattered(10), np.arange(10)[::-1].copy()  # 10 separate runs
    (host_resv if where == "reservation" else host_pool).inject_fault(6)
    with pytest.raises(VmemDriverError) as e:
        host_resv.map(virt, host_pool, phys)
    assert e.value.context["index"] >= 0
    assert (host_resv.mapping() == -1).all()
    assert host_resv.num_mappings == 1 and vmas_in(host_resv) == 1  # the kernel: one VMA, as before
    assert host_backend.info()["mappings_used"] == before_used
    info = host_pool.info()
    assert info["mapped_pages"] == 0 and info["mappings"] == 0
    assert int(host_resv.tensor(torch.uint8, (host_resv.num_bytes,)).sum()) == 0
    host_resv.map(virt, host_pool, phys)  # the fault fired once; the same batch now works
    assert host_resv.mapped_pages == 10 and vmas_in(host_resv) == host_resv.num_mappings == 20


def test_injected_unmap_failure_keeps_everything(host_resv, host_pool):
    virt = _scattered(8)
    host_resv.map(virt, host_pool, np.arange(8))
    views = [page_view(host_resv, v) for v in virt]
    for i, t in enumerate(views):
        t.fill_(i + 1)
    host_resv.inject_fault(4, "oom")
    with pytest.raises(VmemOutOfMemory) as e:
        host_resv.unmap(virt)
    assert isinstance(e.value, MemoryError)
    np.testing.assert_array_equal(host_resv.mapping()[virt], np.arange(8))
    assert [int(t[0]) for t in views] == list(range(1, 9))  # data survived the rollback
    assert vmas_in(host_resv) == host_resv.num_mappings == 16
    host_resv.unmap(virt)
    assert vmas_in(host_resv) == host_resv.num_mappings == 1


def test_bad_arguments_raise_typed_errors_and_change_nothing(host_backend, host_resv, host_pool):
    host_resv.map([0, 1], host_pool, [0, 1])
    state = (host_resv.mapping().copy(), host_pool.info(), host_resv.num_mappings)
    bad = [
        (VmemInvalidArgument, lambda: host_backend.reserve(1 << 20, 1000)),         # unaligned page
        (VmemInvalidArgument, lambda: host_backend.create_pool(6000, 4)),
        (VmemInvalidArgument, lambda: host_backend.reserve(1 << 50, PB)),          # beyond 2^47
        (VmemOutOfMemory, lambda: host_backend.reserve(100 << 40, 2 << 20)),      # no such hole
        (VmemInvalidArgument, lambda: host_resv.map([host_resv.num_pages], host_pool, [2])),
        (VmemInvalidArgument, lambda: host_resv.map([-1], host_pool, [2])),
        (VmemInvalidArgument, lambda: host_resv.map([5], host_pool, [256])),       # phys out of range
        (VmemInvalidArgument, lambda: host_resv.map([1, 2], host_pool, [2, 3])),   # 1 already mapped
        (VmemInvalidArgument, lambda: host_resv.map([4, 4], host_pool, [2, 3])),   # duplicate
        (VmemInvalidArgument, lambda: host_resv.map([4, 5], host_pool, [2])),      # lengths differ
        (VmemInvalidArgument, lambda: host_resv.map([[4]], host_pool, [[2]])),     # not 1-D
        (VmemInvalidArgument, lambda: host_resv.unmap([0, 5])),                    # 5 not mapped
        (VmemInvalidArgument, lambda: host_resv.unmap([0, 0])),
        (VmemInvalidArgument, lambda: host_resv.tensor(torch.float32, (host_resv.num_bytes,))),
        (VmemInvalidArgument, lambda: host_resv.tensor(torch.float32, (4,), offset_bytes=2)),
        (VmemBusyError, lambda: host_pool.trim([5, 0])),                           # 0 is mapped
        (VmemInvalidArgument, lambda: host_pool.trim([1000])),
    ]
    for exc, call in bad:
        with pytest.raises(exc):
            call()
    other_size = host_backend.create_pool(2 * PB, 2)
    with pytest.raises(VmemInvalidArgument, match="page sizes differ"):
        host_resv.map([9], other_size, [0])
    other_size.close()
    assert np.array_equal(host_resv.mapping(), state[0])
    assert host_pool.info() == state[1] and host_resv.num_mappings == state[2]
    host_resv.unmap([0, 1])
    with pytest.raises(VmemInvalidArgument, match="not mapped"):
        host_resv.unmap([0])  # double unmap


def test_use_after_close(host_backend):
    r = host_backend.reserve(1 << 20, 4096)
    p = host_backend.create_pool(4096, 4)
    r.close()
    p.close()
    for call in (lambda: r.map([0], p, [0]), lambda: r.unmap([0]), lambda: r.mapping(),
                 lambda: r.tensor(torch.uint8, (1,)), lambda: p.grow(1), lambda: p.trim([0]),
                 lambda: p.resident_bytes()):
        with pytest.raises(VmemClosedError):
            call()


def os_blocks_bytes(pool) -> int:
    """What the kernel says the pool's memfd holds, asked from Python (not through vmem)."""
    import os

    fd = pool.info()["fd"]
    assert os.readlink("/proc/self/fd/%d" % fd).startswith("/memfd:vmem-pool")
    return os.fstat(fd).st_blocks * 512


def test_pool_accounting_matches_the_os(host_backend):
    with host_backend.create_pool(PB, 64, max_pages=96) as pool, host_backend.reserve(128 * PB, PB) as r:
        assert pool.resident_bytes() == 0 == os_blocks_bytes(pool)
        r.map(np.arange(16), pool, np.arange(16))
        r.map([40, 42], pool, [30, 20])
        r.tensor(torch.uint8, (16 * PB,)).fill_(1)
        info = pool.info()
        assert info["backed_pages"] == 18
        assert pool.resident_bytes() == info["backed_pages"] * PB
        r.unmap(np.arange(8))
        assert pool.resident_bytes() == 18 * PB  # unmapped pages keep their memory until trimmed
        pool.trim(np.arange(8))
        assert pool.resident_bytes() == 10 * PB == pool.info()["backed_pages"] * PB == os_blocks_bytes(pool)
        pool.grow(32)
        assert pool.num_pages == 96
        with pytest.raises(VmemInvalidArgument, match="max_pages"):
            pool.grow(1)
        r.map([100], pool, [95])
        assert pool.resident_bytes() == 11 * PB
        r.map(np.arange(8), pool, np.arange(8))  # trimmed ids come back, zero-filled
        assert int(r.tensor(torch.uint8, (8 * PB,)).sum()) == 0
        assert pool.resident_bytes() == 19 * PB == os_blocks_bytes(pool)


def test_odd_page_size(host_backend):
    pb = 3 * 4096
    with host_backend.reserve(10 * pb, pb) as r, host_backend.create_pool(pb, 4) as p:
        r.map([2, 3], p, [0, 1])
        t = r.tensor(torch.uint8, (2 * pb,), offset_bytes=2 * pb)
        t.fill_(3)
        assert vmas_in(r) == r.num_mappings == 3


def test_contiguous_runs_merge_into_one_vma(host_backend):
    with host_backend.reserve(4096 * 4096, 4096) as r, host_backend.create_pool(4096, 4096) as p:
        r.map(np.arange(4096)[::-1].copy(), p, np.arange(4096)[::-1].copy())  # order does not matter
        assert r.num_mappings == vmas_in(r) == 1
        assert r.stats()["map_ops"] == 1
        r.unmap([100])  # a hole in the middle splits the run: +2
        assert r.num_mappings == vmas_in(r) == 3
        r.map([100], p, [100])  # the right page merges back
        assert r.num_mappings == vmas_in(r) == 1


def test_map_limit_is_a_clear_error_not_a_crash(host_backend):
    """Scattered 4 KiB pages until the budget from vm.max_map_count runs out."""
    info = host_backend.info()
    left = info["map_budget"] - info["mappings_used"]
    n = left // 2 + 64  # each scattered page costs 2 mappings
    with host_backend.reserve(2 * n * 4096 + 4096, 4096) as r, host_backend.create_pool(4096, n) as p:
        virt = np.arange(n, dtype=np.int64) * 2 + 1
        done = 0
        with pytest.raises(VmemMapLimitError, match="vm.max_map_count") as e:
            for lo in range(0, n, 4096):
                hi = min(n, lo + 4096)
                r.map(virt[lo:hi], p, np.arange(lo, hi))
                done = hi
        assert isinstance(e.value, OSError)
        assert done < n
        assert process_vmas() < info["max_map_count"]
        used = host_backend.info()["mappings_used"]
        assert used <= host_backend.info()["map_budget"]
        # what mapped stayed mapped; the failed batch left nothing behind
        assert r.mapped_pages == done and p.info()["mappings"] == done
        # an unmap that merges back frees budget; the kernel agrees with the estimate
        r.unmap(virt[:10])
        assert host_backend.info()["mappings_used"] == used - 20
        assert vmas_in(r) == r.num_mappings
    assert host_backend.info()["mappings_used"] == info["mappings_used"]


def test_budget_counts_unmap_in_the_middle(host_backend):
    with host_backend.reserve(64 * 4096, 4096) as r, host_backend.create_pool(4096, 64) as p:
        r.map(np.arange(64), p, np.arange(64))
        used = host_backend.info()["mappings_used"]
        host_backend.set_map_budget(used + 1)  # a split of the run needs 2 more
        try:
            with pytest.raises(VmemMapLimitError):
                r.unmap([30])
            r.unmap([63])  # at the edge: no new mapping needed
            assert r.mapped_pages == 63
        finally:
            host_backend.set_map_budget(1 << 62)


def test_close_with_live_view_defers_release(host_backend):
    used = host_backend.info()["mappings_used"]
    r = host_backend.reserve(4 * PB, PB)
    p = host_backend.create_pool(PB, 2)
    r.map([0], p, [1])
    t = r.tensor(torch.int32, (PB // 4,))
    t.fill_(11)
    r.close()
    p.close()
    assert r.closed
    with pytest.raises(VmemClosedError):
        r.map([1], p, [0])
    assert int(t[0]) == 11 and int(t.sum()) == 11 * (PB // 4)  # the view keeps the range mapped
    del t
    gc.collect()
    assert host_backend.info()["mappings_used"] == used


def test_view_made_while_another_thread_closes_is_refused(host_backend):
    """tensor() checked 'open' and only then counted the view: a close() in between released the range
    and the new view pointed at unmapped (or reused) address space. Interleaving forced here."""
    r = host_backend.reserve(4 * PB, PB)
    checked = r._handle

    def check_then_lose_the_race(op):
        h = checked(op)
        r.close()                                   # another thread's close lands here
        return h

    r._handle = check_then_lose_the_race
    with pytest.raises(VmemClosedError):
        r.tensor(torch.uint8, (PB,))
    assert r._h is None                             # released: no view was counted


def test_failed_merge_at_the_limit_restores_the_count(host_backend):
    """A map that merges runs frees mappings; if it then fails, the count must come back exactly."""
    with host_backend.reserve(16 * 4096, 4096) as r, host_backend.create_pool(4096, 16) as p:
        r.map([0, 1, 2, 4, 5, 6], p, [0, 1, 2, 4, 5, 6])
        used = host_backend.info()["mappings_used"]
        host_backend.set_map_budget(used)  # exactly full
        try:
            r.inject_fault(1)
            with pytest.raises(VmemDriverError):
                r.map([3], p, [3])  # would merge [0, 7) into one mapping: -2
            assert host_backend.info()["mappings_used"] == used
            r.map([3], p, [3])
            assert host_backend.info()["mappings_used"] == used - 2 and vmas_in(r) == r.num_mappings == 2
        finally:
            host_backend.set_map_budget(1 << 62)


def test_hugetlb_pool_when_the_machine_has_huge_pages(host_backend):
    """Huge pages are used when present, never required (nr_hugepages is 0 by default: skip)."""
    from vmem.backends import Backend

    backend = Backend("host")  # fresh: hugetlb availability is read at open
    if not backend.info()["hugetlb_available"]:
        pytest.skip("no free hugetlb pages (vm.nr_hugepages)")
    hp = 2 << 20
    with backend.create_pool(hp, 2) as pool, backend.reserve(8 * hp, hp) as r:
        assert pool.info()["hugetlb"] == 1 and pool.resident_bytes() == 2 * hp  # reserved up front
        r.map([1, 2], pool, [0, 1])
        t = r.tensor(torch.uint8, (2 * hp,), offset_bytes=hp)
        t.fill_(5)
        assert int(t.sum()) == 5 * 2 * hp and vmas_in(r) == r.num_mappings == 3
        r.unmap([2])
        pool.trim([1])
        assert pool.resident_bytes() == hp


def test_grow_past_the_page_id_limit_is_refused_and_changes_nothing(host_backend):
    """num_pages + grow overflowed int64 (and num_pages * page_bytes overflowed the file size): the
    memfd was truncated under mapped pages and num_pages went negative."""
    with host_backend.create_pool(PB, 16) as pool, host_backend.reserve(16 * PB, PB) as r:
        r.map(np.arange(16), pool, np.arange(16))
        r.tensor(torch.uint8, (16 * PB,)).fill_(7)
        before = pool.info()
        for n in (2**63 - 1, 2**63 - 16, 2**47, (2**62 // PB) + 1):
            with pytest.raises(VmemInvalidArgument):
                pool.grow(n)
        assert pool.info() == before
        assert os_blocks_bytes(pool) == 16 * PB
        import os
        assert os.fstat(pool.info()["fd"]).st_size == 16 * PB
        assert int(r.tensor(torch.uint8, (16 * PB,)).sum()) == 7 * 16 * PB


def test_out_of_range_integers_raise_typed_errors(host_backend, host_resv, host_pool):
    """Numbers cffi cannot convert (negative sizes, > 64 bits) are invalid arguments, not OverflowError."""
    state = (host_resv.mapping().copy(), host_pool.info())
    bad = [
        lambda: host_backend.reserve(-1, PB),
        lambda: host_backend.reserve(2**64, PB),
        lambda: host_backend.reserve(PB, 2**64),
        lambda: host_backend.create_pool(PB, 2**64),
        lambda: host_backend.create_pool(PB, 4, max_pages=2**64),
        lambda: host_pool.grow(2**64),
        lambda: host_pool.trim([2**64]),
        lambda: host_resv.map([2**64], host_pool, [0]),
        lambda: host_resv.map([0], host_pool, [-2**64]),
        lambda: host_resv.unmap([2**70]),
        lambda: host_resv.mapping(0, 2**62),
        lambda: host_resv.mapping(2**64, 1),
        lambda: host_backend.set_map_budget(2**64),
        lambda: host_resv.inject_fault(1, "bogus"),
        lambda: host_pool.inject_fault(2**64),
        lambda: host_resv.tensor("float32", (4,)),
        lambda: host_resv.tensor(torch.float32, ("four",)),
        lambda: host_resv.tensor(torch.float32, (4,), strides=(None,)),
    ]
    for call in bad:
        with pytest.raises(VmemInvalidArgument):
            call()
    assert np.array_equal(host_resv.mapping(), state[0]) and host_pool.info() == state[1]
