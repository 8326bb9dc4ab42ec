"""vmem for SGLang (0.5.23): KV pool buffers are vmem virtual tensors, token ids are arithmetic.

Installed, the ``sglang.srt.plugins`` entry point ``vmem = vmem_sglang:register`` registers hooks with
SGLang's HookRegistry (applied by ``sglang.srt.plugins.load_plugins()``); ``VMEM_SGLANG=0`` turns them
off. See README.md.
"""

from __future__ import annotations

import contextvars
import logging
import os

from vmem_sglang.slots import TokenSlots, make_cache, row_geometry

__version__ = "0.1.0"
TARGET_SGLANG = "0.5.23"

logger = logging.getLogger(__name__)

_CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
_req_to_token_pool = contextvars.ContextVar("vmem_req_to_token_pool", default=None)


def enabled() -> bool:
    return os.environ.get("VMEM_SGLANG", "1") not in ("0", "false", "False", "")


def register() -> None:
    """The entry point: hook pool construction, allocator construction and extend allocation."""
    if not enabled():
        return
    import sglang
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if sglang.__version__ != TARGET_SGLANG:
        logger.warning("vmem_sglang targets sglang==%s, this is %s", TARGET_SGLANG, sglang.__version__)
    HookRegistry.register(_CONFIGURATOR + "._build_token_to_kv_pool", _around_build_pool, HookType.AROUND)
    HookRegistry.register(_CONFIGURATOR + "._build_mha_kv_pool", _around_build_mha_pool, HookType.AROUND)
    HookRegistry.register(_CONFIGURATOR + "._build_token_to_kv_pool_allocator", _around_build_allocator,
                          HookType.AROUND)
    HookRegistry.register("sglang.srt.mem_cache.allocation.alloc_paged_token_slots_extend",
                          around_alloc_extend, HookType.AROUND)
    HookRegistry.register("sglang.srt.mem_cache.allocation.alloc_paged_token_slots_decode",
                          around_alloc_decode, HookType.AROUND)
    HookRegistry.register("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free_rows", around_free_rows,
                          HookType.AROUND)
    logger.info("vmem_sglang %s hooks registered", __version__)


def _around_build_pool(original, self, *args, **kwargs):
    """Remember the request pool: the vmem pool's rows follow it."""
    token = _req_to_token_pool.set(kwargs.get("req_to_token_pool"))
    try:
        return original(self, *args, **kwargs)
    finally:
        _req_to_token_pool.reset(token)


def _around_build_mha_pool(original, self, *, max_total_num_tokens, mha_pool_class, quant_method=None, **kwargs):
    """The plain per-layer MHA pool becomes VmemMHATokenToKVPool; anything else is left alone."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from vmem_sglang.pool import VmemMHATokenToKVPool

    rtp = _req_to_token_pool.get()
    if (mha_pool_class is not MHATokenToKVPool or quant_method is not None or rtp is None
            or getattr(self, "kv_shard_rank", None) is not None):
        logger.warning("vmem_sglang: %s kept (only the plain MHA pool moves to vmem)", mha_pool_class.__name__)
        return original(self, max_total_num_tokens=max_total_num_tokens, mha_pool_class=mha_pool_class,
                        quant_method=quant_method, **kwargs)

    def vmem_pool(size, **pool_kwargs):
        pool_kwargs.pop("post_capture_active", None)
        pool = VmemMHATokenToKVPool(size, num_rows=rtp.size, max_context_len=rtp.max_context_len,
                                    reclaim=os.environ.get("VMEM_SGLANG_RECLAIM", "deferred"), **pool_kwargs)
        pool.vmem_req_to_token_pool = rtp
        return pool

    return original(self, max_total_num_tokens=max_total_num_tokens, mha_pool_class=vmem_pool,
                    quant_method=None, **kwargs)


def _around_build_allocator(original, self, *args, **kwargs):
    from vmem_sglang.pool import VmemMHATokenToKVPool, VmemTokenToKVPoolAllocator

    pool = kwargs.get("token_to_kv_pool")
    if not isinstance(pool, VmemMHATokenToKVPool):
        return original(self, *args, **kwargs)
    allocator = VmemTokenToKVPoolAllocator(pool.physical_tokens, page_size=pool.page_size, dtype=pool.dtype,
                                           device=pool.device, kvcache=pool)
    if getattr(pool, "vmem_req_to_token_pool", None) is not None:
        allocator.attach_req_to_token_pool(pool.vmem_req_to_token_pool)
    return allocator


def _with_request_rows(original, *args, **kwargs):
    """SGLang's extend and decode allocations pass the request rows only to special allocators; hand them
    to ours (decode: so each new token goes to its request's own slot)."""
    tree_cache = kwargs.get("tree_cache", args[0] if args else None)
    allocator = getattr(tree_cache, "token_to_kv_pool_allocator", None)
    if allocator is None or not hasattr(allocator, "pending_rows"):
        return original(*args, **kwargs)
    allocator.pending_rows = kwargs.get("req_pool_indices")
    try:
        return original(*args, **kwargs)
    finally:
        allocator.pending_rows = None


around_alloc_extend = around_alloc_decode = _with_request_rows


def around_free_rows(original, self, indices, *args, **kwargs):
    """ReqToTokenPool.free_rows: a vmem allocator attached to this pool learns that the rows' requests
    are gone (what the radix tree still holds of them stays)."""
    out = original(self, indices, *args, **kwargs)
    released = getattr(self, "_vmem_rows_released", None)
    if released is not None:
        released(list(indices))
    return out


__all__ = ["TokenSlots", "around_alloc_decode", "around_alloc_extend", "around_free_rows", "enabled", "make_cache",
           "register", "row_geometry"]
