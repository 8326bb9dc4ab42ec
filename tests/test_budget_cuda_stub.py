"""Elastic CUDA pools (a budget lease) against the stand-in libcuda of test_native_cuda_stub.py.

What runs here is cuda.c's code path (no handle created up front, handles created in one pass by the map
that needs them, released by trim, the budget charged before the driver is called, rollback when
cuMemCreate runs out), not a GPU: the stand-in driver's memory is host memory. tests/gpu covers the
real driver.
"""
import os
import subprocess
import sys
import textwrap

from test_native_cuda_stub import stub_dir  # noqa: F401  (fixture: builds the stand-in libcuda.so.1)

CHILD = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    from vmem.backends import Budget, get_backend
    from vmem.errors import VmemOutOfMemory
    stub = ctypes.CDLL("libcuda.so.1")
    calls = lambda name: ctypes.c_longlong.in_dll(stub, name).value
    b = get_backend("cuda")
    pb = b.granularity_bytes
    bd = Budget(sys.argv[1], 48 * pb)
    lease = bd.lease("gpu-tenant")
    # 1000 pages of ids: the stand-in driver holds only 64 pages, so handles up front would fail
    p = b.create_pool(pb, 1000, lease=lease)
    r = b.reserve(1000 * pb, pb)
    assert p.resident_bytes() == 0 and lease.info().held_bytes == 0
    r.map([0, 1, 2, 3, 4], p, [900, 3, 500, 4, 7])
    r.map([5], p, [3])                                   # an alias: no new handle, no charge
    assert p.resident_bytes() == 5 * pb == lease.info().held_bytes
    ctypes.memset(r.address, 9, 6 * pb)
    assert ctypes.string_at(r.address + 5 * pb, 1) == bytes([9])   # page 3 seen twice
    # out of budget: refused before the driver is called, nothing changes
    m0 = calls("stub_map_calls")
    try:
        r.map(np.arange(10, 60), p, np.arange(10, 60))
        raise SystemExit("no error")
    except VmemOutOfMemory as e:
        assert e.needed_pages == 50 and e.free_pages == 43, (e.needed_pages, e.free_pages)
    assert calls("stub_map_calls") == m0 and p.resident_bytes() == 5 * pb
    assert (r.mapping(10, 50) == -1).all() and lease.info().waiting_bytes == 7 * pb
    # shrink: unmap + trim releases the handles and the charge
    r.unmap([0, 2])
    p.trim([900, 500])
    assert p.resident_bytes() == 3 * pb == lease.info().held_bytes
    # the budget has room but the driver runs out (cap 64 pages, 3 held): cuMemCreate fails part way,
    # the handles made by this call are released and the charge goes back
    bd.set_limit(200 * pb)
    try:
        r.map(np.arange(100, 170), p, np.arange(100, 170))
        raise SystemExit("no error")
    except VmemOutOfMemory:
        pass
    assert p.resident_bytes() == 3 * pb == lease.info().held_bytes
    r.map(np.arange(100, 140), p, np.arange(100, 140))     # grows again in one batch
    assert p.resident_bytes() == 43 * pb == lease.info().held_bytes
    r.close()
    p.close()
    assert lease.info().held_bytes == 0
    print("STUB-OK")
""")


def test_elastic_cuda_pool_against_stand_in_driver(stub_dir, tmp_path):  # noqa: F811
    env = dict(os.environ, LD_LIBRARY_PATH=str(stub_dir), STUB_CAP_BYTES=str(64 * (64 << 10)))
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "budget")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "STUB-OK" in p.stdout, p.stderr[-3000:]
