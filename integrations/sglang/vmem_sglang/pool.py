"""SGLang 0.5.23 classes over vmem: an MHATokenToKVPool whose buffers are virtual tensors and a token
allocator with arithmetic ids. The logic lives in slots.py (tested without SGLang); these subclasses
only fit it into SGLang's interfaces."""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.allocator import BaseTokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from vmem.errors import VmemInvalidArgument
from vmem_sglang.slots import TokenSlots, make_cache


class VmemMHATokenToKVPool(MHATokenToKVPool):
    """MHATokenToKVPool whose ``k_buffer[l]`` / ``v_buffer[l]`` are vmem virtual tensors.

    ``k_buffer[l]``: [num_slots * row_tokens, head_num, head_dim], store dtype (NHD token rows; num_slots:
    num_rows + 1 + extra slots for rows the radix tree keeps).
    Extra keyword arguments: ``num_rows`` (ReqToTokenPool.size), ``max_context_len`` (its row length),
    ``backend`` ("auto" | "host" | "cuda"), ``page_bytes`` (default: the backend's granularity),
    ``reclaim`` ("deferred" | "eager"). ``size`` keeps SGLang's meaning: the tokens memory may hold.
    """

    def __init__(self, size: int, page_size: int, dtype: torch.dtype, head_num: int, head_dim: int,
                 layer_num: int, device: str, enable_memory_saver: bool, *, num_rows: int, max_context_len: int,
                 backend: str = "auto", page_bytes: int | None = None, reclaim: str = "deferred", **kwargs):
        from vmem.backends import get_backend

        if kwargs.get("post_capture_active") or kwargs.get("kv_cache_layout") not in (None, "nhd") \
                or kwargs.get("v_head_dim") not in (None, head_dim):
            raise VmemInvalidArgument("VmemMHATokenToKVPool supports the plain NHD layout with v_head_dim == "
                                      "head_dim only")
        dev = torch.device(device)
        kind = backend if backend != "auto" else ("cuda" if dev.type == "cuda" else "host")
        self.vmem_cache, self.row_tokens = make_cache(
            num_rows=num_rows, max_context_len=max_context_len, page_size=page_size, num_tokens=size,
            head_num=head_num, head_dim=head_dim, layer_num=layer_num, dtype=dtype,
            backend=get_backend(kind, dev.index or 0), page_bytes=page_bytes, reclaim=reclaim)
        self.num_rows = num_rows
        self.physical_tokens = size
        try:
            super().__init__(self.vmem_cache.num_slots * self.row_tokens - page_size, page_size, dtype, head_num,
                             head_dim, layer_num, device, enable_memory_saver, **kwargs)
        except BaseException:
            self.vmem_cache.close()
            raise

    def _create_buffers(self):
        if self.is_quantized_kv_cache:
            raise VmemInvalidArgument("VmemMHATokenToKVPool does not support quantized KV caches")
        self.k_scale_buffer = self.v_scale_buffer = None
        self.native_k_scale_buffer = self.native_v_scale_buffer = None
        self.dq_k_buffer = self.dq_v_buffer = None
        self.k_buffer, self.v_buffer = [], []
        for layer in range(self.layer_num):
            k, v = self.vmem_cache.kv(layer)                    # [num_slots, row_tokens, H, D], contiguous
            self.k_buffer.append(k.view(-1, self.head_num, self.head_dim))
            self.v_buffer.append(v.view(-1, self.head_num, self.v_head_dim))
        self._kv_buffer_descs = self._build_kv_buffer_descs()
        self._init_data_ptrs_and_strides()

    def get_kv_size_bytes(self):
        """Physical bytes of the pool (K half, V half): what memory reports should count."""
        total = self.vmem_cache.stats().total_bytes
        return total // 2, total - total // 2


class VmemTokenToKVPoolAllocator(BaseTokenToKVPoolAllocator):
    """Paged-allocator interface (``alloc_extend`` / ``alloc_decode`` / ``free``) over TokenSlots."""

    def __init__(self, size: int, page_size: int, dtype: torch.dtype, device: str, kvcache: VmemMHATokenToKVPool,
                 need_sort: bool = False):
        if not isinstance(kvcache, VmemMHATokenToKVPool):
            raise VmemInvalidArgument("VmemTokenToKVPoolAllocator needs a VmemMHATokenToKVPool")
        if page_size != kvcache.page_size:
            raise VmemInvalidArgument("page_size %d differs from the pool's %d" % (page_size, kvcache.page_size))
        super().__init__(size, page_size, dtype, device, kvcache, need_sort)
        self.slots = TokenSlots(kvcache.vmem_cache, kvcache.row_tokens, page_size)
        self.debug_mode = False
        self.pending_rows = None        # req_pool_indices of the extend / decode in flight (plugin hooks set it)

    def attach_req_to_token_pool(self, req_to_token_pool) -> None:
        """Learn when SGLang gives request rows back (the plugin's hook on ReqToTokenPool.free_rows calls
        ``req_to_token_pool._vmem_rows_released``): a row's slot then stays only while the radix tree holds
        tokens in it. Needed with the radix cache on."""
        req_to_token_pool._vmem_rows_released = self.slots.rows_released
        self.slots.track_rows = True

    def available_size(self):
        return self.slots.available_tokens()

    def get_all_free_pages(self):
        return None

    def clear(self):
        self.slots.clear()

    def alloc(self, need_size: int):
        raise VmemInvalidArgument("vmem token ids are per request: run SGLang with a page size > 1 so it calls "
                                  "alloc_extend / alloc_decode")

    def alloc_extend(self, prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens,
                     req_pool_indices=None, **kwargs):
        """Token ids of positions [prefix_lens[i], seq_lens[i]): [extend_num_tokens] int64, or None (OOM)."""
        rows = req_pool_indices if req_pool_indices is not None else self.pending_rows
        if rows is None:
            if int((prefix_lens_cpu == 0).sum()):
                raise VmemInvalidArgument("alloc_extend of a new request needs req_pool_indices (the vmem "
                                          "plugin's hook on alloc_paged_token_slots_extend passes them)")
            rows = [self.slots.row_of_token(loc) for loc in last_loc.tolist()]
        rows = rows.tolist() if hasattr(rows, "tolist") else list(rows)
        out = self.slots.extend(rows, prefix_lens_cpu.tolist(), seq_lens_cpu.tolist(), last_loc.tolist())
        if out is None:
            return None
        if out.size != extend_num_tokens:
            raise VmemInvalidArgument("extend_num_tokens=%d, the lengths add up to %d" % (extend_num_tokens,
                                                                                         out.size))
        return torch.from_numpy(out).to(self.device)

    def alloc_decode(self, seq_lens, seq_lens_cpu, last_loc, req_pool_indices=None, **kwargs):
        """Token id of position seq_lens[i] - 1 of each request: [batch] int64, or None (OOM). The request
        rows come from the plugin's hook (with the radix cache a request's last token may lie in another
        request's slot); without them, from the slot of last_loc."""
        rows = req_pool_indices if req_pool_indices is not None else self.pending_rows
        if rows is not None:
            rows = rows.tolist() if hasattr(rows, "tolist") else list(rows)
        out = self.slots.decode(last_loc.tolist(), seq_lens_cpu.tolist(), rows)
        return None if out is None else torch.from_numpy(out).to(self.device)

    def free(self, free_index: torch.Tensor):
        if free_index.numel() == 0:
            return
        if self.free_group is not None:
            self.free_group.append(self._copy_for_free_group(free_index))
            return
        self.slots.free(free_index.detach().cpu().numpy())

    def check_integrity(self) -> None:
        self.slots.check_integrity()
