"""StaticKVCache: the Orca/FasterTransformer baseline: every slot owns max_seq_len tokens up front.

Same layouts and views as the virtual cache, over plain dense torch tensors; a *page* in its stats is
one whole slot (max_seq_len tokens, all layers, K and V), so memory_bytes buys whole slots.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from vmem.allocator.base import SlotCache, check_memory_bytes, synchronized, transaction
from vmem.allocator.spec import KVCacheSpec
from vmem.allocator.stats import CacheStats
from vmem.errors import VmemIntegrityError, VmemInvalidArgument


class StaticKVCache(SlotCache):
    """Dense per-slot K/V, ``min(max_batch, memory_bytes // slot_bytes)`` slots.

    Invariants: a slot's memory exists from construction; lengths of free slots are 0.
    """

    kind = "static"

    def __init__(self, spec: KVCacheSpec, *, memory_bytes: int | None = None, device=None, **_ignored):
        self.slot_bytes = spec.max_seq_len * spec.token_bytes
        num_slots = spec.max_batch
        if check_memory_bytes(memory_bytes) is not None:
            num_slots = min(num_slots, memory_bytes // self.slot_bytes)
            if num_slots < 1:
                raise VmemInvalidArgument("memory_bytes=%d holds no %d-byte max-length slot"
                                          % (memory_bytes, self.slot_bytes))
        super().__init__(spec, num_slots, device)
        shape = list(spec.plane_shape)
        shape[0] = num_slots
        if spec.layout == "HND":
            shape[2] = spec.max_seq_len
        else:
            shape[1] = spec.max_seq_len
        self._planes = [torch.empty(shape, dtype=spec.dtype, device=self.device) for _ in range(spec.num_planes)]

    @synchronized
    def pages_needed(self, needs: Mapping[int, int]) -> int:
        self._parse_needs(needs)
        return 0

    def _available_pages(self) -> int:
        return 0

    @transaction
    def step(self, needs: Mapping[int, int]) -> None:
        """Nothing to map: validate and record the lengths."""
        slots, tokens = self._parse_needs(needs)
        self._record_lengths(slots, tokens)
        self._note_used(self.num_slots - self.num_free_slots)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of a layer: [num_slots, max_seq_len, Hkv, D] (NHD, GROUPED strided) or
        [num_slots, Hkv, max_seq_len, D] (HND), spec.dtype."""
        self._check_open()
        return self.spec.layer_views(self._planes, layer)

    def attention(self, layer, q, k, v, cache_seqlens, slots, causal=True, softmax_scale=None):
        """q: [B, S, Hq, D]; k, v: [B, S, Hkv, D]; cache_seqlens, slots: [B] int32 -> out [B, S, Hq, D]."""
        from vmem.attention import flash_attn_with_kvcache
        self._check_attention_args(q, cache_seqlens, slots)
        k_cache, v_cache = self.kv(layer)
        return flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                       cache_batch_idx=slots, softmax_scale=softmax_scale, causal=causal,
                                       kv_layout=self.spec.kv_layout)

    @synchronized
    def stats(self) -> CacheStats:
        used = int(np.count_nonzero(self._live))
        return self._stats(page_bytes=self.slot_bytes, total_pages=self.num_slots, used_pages=used,
                           reclaimable_pages=0)

    @synchronized
    def check_integrity(self) -> None:
        self._check_open()
        if np.any(self._lengths[~self._live]) or np.any(self._lengths > self.spec.max_seq_len):
            raise VmemIntegrityError("static cache: a free slot has a length, or a length exceeds max_seq_len")

    @synchronized
    def close(self) -> None:
        if self._closed:
            return
        self._planes = []
        super().close()
