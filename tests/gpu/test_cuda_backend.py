"""The cuda backend on a real GPU (skipped without one). cuda-bindings is the independent oracle:
the driver itself says what is mapped where (cuMemRetainAllocationHandle, cuMemGetAccess)."""
import threading

import numpy as np
import pytest
import torch

from vmem.errors import VmemDriverError, VmemInvalidArgument

pytestmark = pytest.mark.gpu

try:  # cuda-python >= 12.8 / 13
    from cuda.bindings import driver as cu
except ImportError:  # pragma: no cover - older layout
    try:
        from cuda import cuda as cu
    except ImportError:
        cu = None


@pytest.fixture(scope="module")
def gpu():
    from vmem.backends import get_backend

    return get_backend("cuda", 0)


@pytest.fixture
def pb(gpu):
    return gpu.granularity_bytes


def driver_mapped(addr: int) -> bool:
    """Ask the driver (not vmem) whether a physical allocation backs ``addr``."""
    if cu is None:
        pytest.skip("cuda-bindings not installed")
    err, handle = cu.cuMemRetainAllocationHandle(addr)
    if err != cu.CUresult.CUDA_SUCCESS:
        return False
    cu.cuMemRelease(handle)
    return True


def driver_access_rw(addr: int, device: int = 0) -> bool:
    if cu is None:
        pytest.skip("cuda-bindings not installed")
    loc = cu.CUmemLocation()
    loc.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    loc.id = device
    err, flags = cu.cuMemGetAccess(loc, addr)
    return err == cu.CUresult.CUDA_SUCCESS and int(flags) == 3


def test_backend_info(gpu, pb):
    assert gpu.name == "cuda" and str(gpu.device) == "cuda:0"
    assert pb >= 4096 and pb & (pb - 1) == 0
    with pytest.raises(VmemInvalidArgument):
        gpu.reserve(pb * 4, pb // 2)
    assert gpu.info()["granularity_bytes"] == pb


def test_map_write_read_through_views(gpu, pb):
    with gpu.reserve(16 * pb, pb) as r, gpu.create_pool(pb, 8) as p:
        r.map([0, 1, 2], p, [5, 6, 7])
        t = r.tensor(torch.float32, (3 * pb // 4,))
        assert t.device.type == "cuda" and t.data_ptr() == r.address
        t.copy_(torch.arange(t.numel(), device="cuda", dtype=torch.float32))
        torch.cuda.synchronize()
        assert float(t[-1]) == t.numel() - 1
        for v in range(3):
            assert driver_mapped(r.address + v * pb) and driver_access_rw(r.address + v * pb)
        assert not driver_mapped(r.address + 3 * pb)
        assert r.num_mappings == 1  # one contiguous run, one cuMemSetAccess
        assert r.stats()["map_ops"] == 1


def test_second_mapping_and_zero_copy_move(gpu, pb):
    with gpu.reserve(16 * pb, pb) as r, gpu.create_pool(pb, 4) as p:
        r.map([0, 9], p, [2, 2])
        a = r.tensor(torch.int32, (pb // 4,))
        b = r.tensor(torch.int32, (pb // 4,), offset_bytes=9 * pb)
        a.fill_(41)
        torch.cuda.synchronize()
        assert int(b.sum()) == 41 * (pb // 4)
        r.unmap([0])
        assert not driver_mapped(r.address)
        r.map([4], p, [2])
        c = r.tensor(torch.int32, (pb // 4,), offset_bytes=4 * pb)
        assert int(c[7]) == 41


def test_injected_failure_rolls_back(gpu, pb):
    with gpu.reserve(16 * pb, pb) as r, gpu.create_pool(pb, 8) as p:
        r.inject_fault(3)
        with pytest.raises(VmemDriverError):
            r.map([0, 2, 4, 6], p, [0, 1, 2, 3])
        assert (r.mapping() == -1).all() and p.info()["mappings"] == 0
        for v in range(8):
            assert not driver_mapped(r.address + v * pb)
        r.map([0, 2, 4, 6], p, [0, 1, 2, 3])
        assert all(driver_mapped(r.address + v * pb) for v in (0, 2, 4, 6))


def test_trim_and_pool_accounting(gpu, pb):
    free0, _ = torch.cuda.mem_get_info()
    with gpu.create_pool(pb, 32) as p:
        free1, _ = torch.cuda.mem_get_info()
        assert free0 - free1 >= 32 * pb * 0.9  # pooled: the handles hold memory up front
        assert p.resident_bytes() == 32 * pb
        p.trim(np.arange(16))
        assert p.resident_bytes() == 16 * pb
        with gpu.reserve(4 * pb, pb) as r:
            r.map([0], p, [3])  # a trimmed page gets a new handle
            t = r.tensor(torch.uint8, (pb,))
            t.fill_(1)
            torch.cuda.synchronize()
            assert int(t.sum()) == pb


def test_async_worker_thread_has_the_context(gpu, pb):
    with gpu.reserve(64 * pb, pb) as r, gpu.create_pool(pb, 32) as p, gpu.async_mapper() as m:
        t = m.submit(r, np.arange(0, 64, 2), p, np.arange(32))
        m.wait(t)
        assert all(driver_mapped(r.address + v * pb) for v in range(0, 64, 2))
        view = r.tensor(torch.uint8, (pb,), offset_bytes=62 * pb)
        view.fill_(3)
        torch.cuda.synchronize()
        assert int(view.sum()) == 3 * pb


def test_two_threads_map_concurrently(gpu, pb):
    with gpu.reserve(64 * pb, pb) as r, gpu.create_pool(pb, 64) as p:
        def work(k):
            virt = np.arange(k, 64, 2)
            for _ in range(5):
                r.map(virt, p, virt)
                r.unmap(virt)
            r.map(virt, p, virt)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        np.testing.assert_array_equal(r.mapping(), np.arange(64))
        assert r.num_mappings == 1
        assert all(driver_mapped(r.address + v * pb) for v in range(64))


def test_view_keeps_reservation_alive(gpu, pb):
    r = gpu.reserve(4 * pb, pb)
    p = gpu.create_pool(pb, 1)
    r.map([0], p, [0])
    t = r.tensor(torch.float16, (pb // 2,))
    r.close()
    p.close()
    t.fill_(1)
    torch.cuda.synchronize()
    assert driver_mapped(t.data_ptr())
    addr = t.data_ptr()
    del t
    import gc

    gc.collect()
    assert not driver_mapped(addr)
