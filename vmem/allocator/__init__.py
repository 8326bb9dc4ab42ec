"""KV cache managers: the virtual cache (vmem) and the paged and static baselines behind one protocol.

    spec = KVCacheSpec(num_layers=2, num_kv_heads=4, head_dim=64, max_batch=8, max_seq_len=2048)
    cache = make_cache("vmem", spec, memory_bytes=64 << 20)        # or "paged", "static"
    slot = cache.alloc_slot()
    cache.step({slot: 100})                                          # tokens [0, 100) writable
    k_cache, v_cache = cache.kv(0)                                   # [max_batch, max_seq_len, Hkv, D]
"""

from __future__ import annotations

import torch

from vmem.allocator.base import KVCacheManager, SlotCache
from vmem.allocator.cache import VirtualKVCache
from vmem.allocator.paged import PagedKVCache
from vmem.allocator.policy import FewestPagesFirst, ReclaimPolicy, SlotPolicy
from vmem.allocator.spec import KVCacheSpec
from vmem.allocator.static import StaticKVCache
from vmem.allocator.elastic import BudgetPolicy
from vmem.allocator.stats import CacheStats
from vmem.errors import VmemInvalidArgument

CACHE_KINDS = ("vmem", "paged", "static")


def make_cache(kind: str, spec: KVCacheSpec, *, memory_bytes: int | None = None, backend="auto", device=None,
               reclaim: str = "deferred", async_map: bool = False, **kwargs) -> KVCacheManager:
    """One of the three managers for ``spec`` under a physical budget of ``memory_bytes``.

    vmem: ``backend`` ("auto" | "host" | "cuda" or a Backend), ``reclaim`` ("deferred" | "eager"),
    ``async_map``, ``reclaim_policy``. paged: ``block_size`` (16). Baselines allocate plain torch
    tensors on ``device`` and ignore the vmem-only arguments; ``device=None`` puts them where vmem's
    backend would put the cache: CUDA when ``backend`` is "auto" or "cuda" and torch sees a GPU, else CPU.
    """
    if kind == "vmem":
        return VirtualKVCache(spec, memory_bytes=memory_bytes, backend=backend, device=device, reclaim=reclaim,
                              async_map=async_map, **kwargs)
    if device is None and backend in ("auto", "cuda") and torch.cuda.is_available():
        device = "cuda"              # baselines sit where vmem's "auto" backend would put the cache
    if kind == "paged":
        return PagedKVCache(spec, memory_bytes=memory_bytes, device=device, **kwargs)
    if kind == "static":
        return StaticKVCache(spec, memory_bytes=memory_bytes, device=device, **kwargs)
    raise VmemInvalidArgument("cache kind must be one of %s, got %r" % (CACHE_KINDS, kind))


__all__ = ["BudgetPolicy", "CACHE_KINDS", "CacheStats", "FewestPagesFirst", "KVCacheManager", "KVCacheSpec", "PagedKVCache",
           "ReclaimPolicy", "SlotCache", "SlotPolicy", "StaticKVCache", "VirtualKVCache", "make_cache"]
