"""Elastic CUDA pools and caches on a real device (skipped without one): no handle up front, handles
created by the map that needs them and released by trim, the budget charged before the driver is called,
an elastic VirtualKVCache giving its pages back when idle. tests/test_budget_cuda_stub.py runs the same
code path against a stand-in driver on machines without a GPU."""

import numpy as np
import pytest
import torch

from vmem.allocator import BudgetPolicy, KVCacheSpec, VirtualKVCache
from vmem.backends import Budget, get_backend
from vmem.errors import VmemOutOfMemory

pytestmark = pytest.mark.gpu


def test_elastic_cuda_pool_grows_and_shrinks(tmp_path):
    b = get_backend("cuda")
    pb = b.granularity_bytes
    bd = Budget(str(tmp_path / "kv"), 16 * pb)
    lease = bd.lease("gpu")
    pool = b.create_pool(pb, 1024, lease=lease)
    r = b.reserve(1024 * pb, pb)
    assert pool.resident_bytes() == 0
    r.map(np.arange(8), pool, np.arange(100, 108))
    assert pool.resident_bytes() == 8 * pb == lease.info().held_bytes
    with pytest.raises(VmemOutOfMemory):
        r.map(np.arange(8, 20), pool, np.arange(200, 212))
    assert (r.mapping(8, 12) == -1).all() and pool.resident_bytes() == 8 * pb
    view = r.tensor(torch.float32, (8 * pb // 4,))
    view.fill_(3.0)
    torch.cuda.synchronize()
    assert float(view[-1]) == 3.0
    del view
    r.unmap(np.arange(4))
    pool.trim(np.arange(100, 104))
    assert pool.resident_bytes() == 4 * pb == lease.info().held_bytes
    r.close()
    pool.close()
    assert lease.info().held_bytes == 0


def test_elastic_cache_on_cuda_gives_pages_back_when_idle(tmp_path):
    bd = Budget(str(tmp_path / "kv"), 256 << 20)
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float16, max_batch=4,
                       max_seq_len=2048, page_bytes=2 << 20)
    c = VirtualKVCache(spec, backend="cuda", budget=bd, budget_policy=BudgetPolicy(idle_release_s=0.0))
    s = c.alloc_slot()
    c.step({s: 1500})
    held = c.stats().budget_held_pages
    assert held > 0 and c.pool.resident_bytes() == held * spec.page_bytes
    c.free_slot(s)
    c.maintain(force=True)
    assert c.stats().budget_held_pages == 0 and c.pool.resident_bytes() == 0
    c.check_integrity()
    c.close()
    assert bd.info().held_bytes == 0
