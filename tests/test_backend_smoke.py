"""Smoke tests of the host backend through the Python layer."""
import numpy as np
import pytest
import torch

import vmem
from vmem.backends import get_backend
from vmem.errors import VmemClosedError, VmemInvalidArgument, VmemUnsupported


def test_get_backend_kinds():
    assert get_backend("host").name == "host"
    assert get_backend("host") is get_backend("host")
    assert get_backend("auto").name in ("host", "cuda")
    with pytest.raises(VmemInvalidArgument):
        get_backend("tpu")


def test_auto_backend_follows_cuda_availability():
    # "auto" is cuda exactly when the cuda backend can run here, host otherwise; "cuda" without a
    # driver or device is a typed refusal, never a crash.
    from vmem.backends import cuda_available

    if cuda_available():
        b = get_backend("cuda")
        assert b.name == "cuda" and get_backend("auto") is b and b.granularity_bytes % 4096 == 0
    else:
        with pytest.raises(VmemUnsupported, match="not supported"):
            get_backend("cuda")
        assert get_backend("auto").name == "host"


def test_map_write_read_unmap(host_resv, host_pool):
    pb = host_resv.page_bytes
    t = host_resv.tensor(torch.int32, (host_resv.num_bytes // 4,))
    assert t.data_ptr() == host_resv.address
    host_resv.map([0, 1, 2], host_pool, [5, 6, 7])
    t[: 3 * pb // 4] = 7
    assert int(t[: 3 * pb // 4].sum()) == 7 * 3 * pb // 4
    np.testing.assert_array_equal(host_resv.mapping(0, 4), [5, 6, 7, -1])
    assert host_resv.num_mappings == 2  # the run + the rest of the reservation
    host_resv.unmap([0, 1, 2])
    assert int(t[: 3 * pb // 4].abs().sum()) == 0
    assert host_resv.num_mappings == 1


def test_context_managers_and_close(host_backend):
    with host_backend.reserve(1 << 20, 4096) as r, host_backend.create_pool(4096, 4) as p:
        r.map([0], p, [0])
    assert r.closed and p.closed
    with pytest.raises(VmemClosedError):
        r.map([1], p, [1])
    with pytest.raises(VmemClosedError):
        p.grow(1)
    r.close()  # idempotent


def test_stale_extension_is_refused():
    """The extension's version stamp must equal the package's, else import fails loudly."""
    import subprocess
    import sys

    code = ("import importlib, vmem._version as v, vmem._native as f\n"
            "v.__version__ = '0.0.0-other'\n"
            "try:\n    importlib.reload(f)\nexcept ImportError as e:\n    print('REFUSED', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "REFUSED" in out and "stale" in out and "0.0.0-other" in out


def test_backend_info_reports_limits(host_backend):
    info = host_backend.info()
    assert info["max_map_count"] > 0 and 0 < info["map_budget"] < info["max_map_count"]
    assert info["granularity_bytes"] % 4096 == 0
