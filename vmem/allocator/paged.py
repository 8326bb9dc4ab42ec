"""PagedKVCache: the vLLM-style baseline (block tables over a pool allocated up front).

Each layer's K and V are pools ``[num_blocks, block_size, Hkv, D]``; a request owns a list of block ids
(its block table row); block ``b`` holds the same 16 token positions in every layer, as in vLLM.
Attention gathers through the block table (vmem.attention.paged_attention_with_kvcache).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import numpy as np
import torch

from vmem.allocator.base import SlotCache
from vmem.allocator.spec import KVCacheSpec
from vmem.allocator.stats import CacheStats
from vmem.errors import VmemIntegrityError, VmemInvalidArgument, VmemOutOfMemory

DEFAULT_BLOCK_SIZE = 16


class PagedKVCache(SlotCache):
    """Block-table KV cache; a *page* in its stats is one block (block_size tokens, all layers, K and V).

    ``memory_bytes`` bounds the pool (None: room for max_batch requests of max_seq_len).

    Invariants: every block is free or owned by exactly one live slot; a live slot owns
    ``ceil(length / block_size)`` blocks or more; free + owned = num_blocks.
    """

    kind = "paged"

    def __init__(self, spec: KVCacheSpec, *, memory_bytes: int | None = None, device=None,
                 block_size: int = DEFAULT_BLOCK_SIZE, **_ignored):
        super().__init__(spec, spec.max_batch, device)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise VmemInvalidArgument("block_size must be a positive int, got %r" % (block_size,))
        self.block_size = block_size
        self.block_bytes = block_size * spec.token_bytes
        self.max_blocks_per_seq = -(-spec.max_seq_len // block_size)
        if memory_bytes is None:
            num_blocks = spec.max_batch * self.max_blocks_per_seq
        else:
            if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= 0:
                raise VmemInvalidArgument("memory_bytes must be a positive int, got %r" % (memory_bytes,))
            num_blocks = memory_bytes // self.block_bytes
        if num_blocks < 1:
            raise VmemInvalidArgument("memory_bytes=%s holds no %d-byte block" % (memory_bytes, self.block_bytes))
        self.num_blocks = int(num_blocks)
        shape = (spec.num_layers, 2, self.num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self._pool = torch.empty(shape, dtype=spec.dtype, device=self.device)
        self._free_blocks = deque(range(self.num_blocks))
        self._blocks: list[list[int]] = [[] for _ in range(spec.max_batch)]
        self.block_table = np.zeros((spec.max_batch, self.max_blocks_per_seq), dtype=np.int32)

    def _blocks_for(self, num_tokens: np.ndarray) -> np.ndarray:
        return -(-num_tokens // self.block_size)

    def pages_needed(self, needs: Mapping[int, int]) -> int:
        slots, tokens = self._parse_needs(needs)
        owned = np.fromiter((len(self._blocks[s]) for s in slots), dtype=np.int64, count=slots.size)
        return int(np.maximum(self._blocks_for(tokens) - owned, 0).sum())

    def _available_pages(self) -> int:
        return len(self._free_blocks)

    def step(self, needs: Mapping[int, int]) -> None:
        """Give every slot blocks for [0, needs[slot]); atomic: VmemOutOfMemory changes nothing."""
        slots, tokens = self._parse_needs(needs)
        wanted = self._blocks_for(tokens)
        needed = sum(max(0, int(w) - len(self._blocks[s])) for s, w in zip(slots, wanted))
        if needed > len(self._free_blocks):
            raise VmemOutOfMemory("paged.step: %d blocks needed, %d free" % (needed, len(self._free_blocks)),
                                  needed_pages=needed, free_pages=len(self._free_blocks), op="paged.step")
        for s, w in zip(slots.tolist(), wanted.tolist()):
            owned = self._blocks[s]
            while len(owned) < w:
                block = self._free_blocks.popleft()
                self.block_table[s, len(owned)] = block
                owned.append(block)
        self._record_lengths(slots, tokens)
        self._note_used(self.num_blocks - len(self._free_blocks))

    def _release_slot(self, slot: int) -> None:
        self._free_blocks.extend(self._blocks[slot])
        self._blocks[slot] = []
        self.block_table[slot] = 0

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_pool, v_pool): [num_blocks, block_size, Hkv, D] each, spec.dtype."""
        self._check_open()
        layer = self.spec.check_layer(layer)
        return self._pool[layer, 0], self._pool[layer, 1]

    def block_table_for(self, slots: torch.Tensor) -> torch.Tensor:
        """Block table rows of ``slots`` ([B] int32): [B, max_blocks_per_seq] int32 on the cache's device."""
        rows = self.block_table[slots.detach().cpu().numpy().astype(np.int64)]
        return torch.from_numpy(rows).to(self.device)

    def attention(self, layer, q, k, v, cache_seqlens, slots, causal=True, softmax_scale=None):
        """q: [B, S, Hq, D]; k, v: [B, S, Hkv, D]; cache_seqlens, slots: [B] int32 -> out [B, S, Hq, D]."""
        from vmem.attention import paged_attention_with_kvcache
        self._check_attention_args(q, cache_seqlens, slots)
        k_pool, v_pool = self.kv(layer)
        return paged_attention_with_kvcache(q, k_pool, v_pool, self.block_table_for(slots), k=k, v=v,
                                            cache_seqlens=cache_seqlens, softmax_scale=softmax_scale, causal=causal)

    def stats(self) -> CacheStats:
        used = self.num_blocks - len(self._free_blocks)
        return self._stats(page_bytes=self.block_bytes, total_pages=self.num_blocks, used_pages=used,
                           reclaimable_pages=0)

    def check_integrity(self) -> None:
        self._check_open()
        problems = []
        owned = [b for blocks in self._blocks for b in blocks]
        everything = owned + list(self._free_blocks)
        if sorted(everything) != list(range(self.num_blocks)):
            problems.append("blocks are lost or owned twice (%d owned + %d free != %d)"
                            % (len(owned), len(self._free_blocks), self.num_blocks))
        for s in range(self.num_slots):
            blocks = self._blocks[s]
            if not self._live[s] and (blocks or self._lengths[s]):
                problems.append("free slot %d still owns blocks or a length" % s)
            if len(blocks) < self._blocks_for(self._lengths[s]):
                problems.append("slot %d: %d blocks for %d tokens" % (s, len(blocks), self._lengths[s]))
            if list(self.block_table[s, :len(blocks)]) != blocks:
                problems.append("slot %d: block table row disagrees with its blocks" % s)
        if problems:
            raise VmemIntegrityError("; ".join(problems))

    def close(self) -> None:
        if self._closed:
            return
        self._pool = None
        super().close()
