"""PagedKVCache: the vLLM-style baseline (block tables over a pool allocated up front).

Each layer's K and V are pools ``[num_blocks, block_size, Hkv, D]``; a request owns a list of block ids
(its block table row); block ``b`` holds the same 16 token positions in every layer, as in vLLM.
Attention gathers through the block table (vmem.attention.paged_attention_with_kvcache).

Prefix caching, as vLLM v1 does it (vllm/v1/core/block_pool.py, kv_cache_utils.py): a full block is
named by a hash chained over its parent's hash and its own tokens (sha256 here); ``cache_prefix`` enters
a slot's full blocks in a hash -> block map; ``alloc_slot(token_ids=...)`` looks the prompt's blocks up
chain by chain and shares the hits (reference counts, no copy). A block whose count drops to 0 goes to
the tail of an LRU free queue *keeping its hash* (a slot's blocks are queued last block first, so the
tails of prompts are evicted first); allocation pops the head and only then forgets its hash. A hit on
a queued block takes it out of the queue.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

from vmem.allocator.base import SlotCache, check_memory_bytes, synchronized, transaction
from vmem.allocator.spec import KVCacheSpec
from vmem.allocator.stats import CacheStats
from vmem.errors import VmemIntegrityError, VmemInvalidArgument, VmemOutOfMemory

DEFAULT_BLOCK_SIZE = 16
_ROOT_HASH = hashlib.sha256(b"vmem paged prefix root").digest()


def hash_block(parent: bytes, token_ids) -> bytes:
    """vLLM's chained block hash: sha256 over the parent block's hash and this block's token ids."""
    return hashlib.sha256(parent + np.asarray(token_ids, dtype=np.int64).tobytes()).digest()


class PagedKVCache(SlotCache):
    """Block-table KV cache; a *page* in its stats is one block (block_size tokens, all layers, K and V).

    ``memory_bytes`` bounds the pool (None: room for max_batch requests of max_seq_len).

    Invariants: a block's reference count is the number of live slots owning it, and it is in the free
    queue iff that count is 0; a live slot owns ``ceil(length / block_size)`` blocks or more; the hash
    map and the blocks' hashes agree; a block shared by several slots, or hashed, lies in the slots'
    cached prefix (``num_cached_tokens``), which they never write: it is never handed out writable.
    """

    kind = "paged"

    def __init__(self, spec: KVCacheSpec, *, memory_bytes: int | None = None, device=None,
                 block_size: int = DEFAULT_BLOCK_SIZE, prefix_caching: bool = True, **_ignored):
        super().__init__(spec, spec.max_batch, device)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise VmemInvalidArgument("block_size must be a positive int, got %r" % (block_size,))
        self.block_size = block_size
        self.block_bytes = block_size * spec.token_bytes
        self.max_blocks_per_seq = -(-spec.max_seq_len // block_size)
        if check_memory_bytes(memory_bytes) is None:
            num_blocks = spec.max_batch * self.max_blocks_per_seq
        else:
            num_blocks = memory_bytes // self.block_bytes
        if num_blocks < 1:
            raise VmemInvalidArgument("memory_bytes=%s holds no %d-byte block" % (memory_bytes, self.block_bytes))
        self.num_blocks = int(num_blocks)
        shape = (spec.num_layers, 2, self.num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self._pool = torch.empty(shape, dtype=spec.dtype, device=self.device)
        self._free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(self.num_blocks))   # LRU head first
        self._blocks: list[list[int]] = [[] for _ in range(spec.max_batch)]
        self.block_table = np.zeros((spec.max_batch, self.max_blocks_per_seq), dtype=np.int32)
        self.prefix_caching = bool(prefix_caching)
        self._ref = np.zeros(self.num_blocks, dtype=np.int32)
        self._block_hash: dict[int, bytes] = {}          # block -> its hash, while cached
        self._cached: dict[bytes, int] = {}              # hash -> block
        self._slot_hashes: list[list[bytes]] = [[] for _ in range(spec.max_batch)]   # chain of a slot's full blocks
        self._counters.update(prefix_hit_blocks=0, prefix_cached_blocks=0, prefix_evicted_blocks=0,
                              kv_bytes_copied=0)

    def _blocks_for(self, num_tokens: np.ndarray) -> np.ndarray:
        return -(-num_tokens // self.block_size)

    @synchronized
    def pages_needed(self, needs: Mapping[int, int]) -> int:
        slots, tokens = self._parse_needs(needs)
        owned = np.fromiter((len(self._blocks[s]) for s in slots), dtype=np.int64, count=slots.size)
        return int(np.maximum(self._blocks_for(tokens) - owned, 0).sum())

    def _available_pages(self) -> int:
        return len(self._free_blocks)

    @transaction
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
                block = self._pop_free()
                self._ref[block] = 1
                self.block_table[s, len(owned)] = block
                owned.append(block)
        self._record_lengths(slots, tokens)
        self._note_used(self.num_blocks - len(self._free_blocks))

    def _pop_free(self) -> int:
        block, _ = self._free_blocks.popitem(last=False)
        old = self._block_hash.pop(block, None)
        if old is not None:                      # evicted from the prefix cache by reuse
            del self._cached[old]
            self._counters["prefix_evicted_blocks"] += 1
        return block

    def _release_slot(self, slot: int) -> None:
        for block in reversed(self._blocks[slot]):   # tail blocks first in line for eviction
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._free_blocks[block] = None
        self._blocks[slot] = []
        self._slot_hashes[slot] = []
        self.block_table[slot] = 0

    # ---- prefix caching ---------------------------------------------------------------------
    def _chain(self, token_ids, parent: bytes, first: int, end: int) -> list[bytes]:
        """Hashes of full blocks [first, end) of token_ids, chained from ``parent``."""
        out, b = [], self.block_size
        for i in range(first, end):
            parent = hash_block(parent, token_ids[i * b:(i + 1) * b])
            out.append(parent)
        return out

    def _hits(self, token_ids: list[int]) -> list[int]:
        """Cached blocks spelling the prompt's leading full blocks, all but its last token."""
        hits, parent = [], _ROOT_HASH
        for i in range(max(len(token_ids) - 1, 0) // self.block_size):
            parent = hash_block(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            block = self._cached.get(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    @synchronized
    def match_prefix(self, token_ids) -> int:
        self._check_open()
        ids = self._check_token_ids(token_ids)
        return len(self._hits(ids)) * self.block_size if self.prefix_caching else 0

    def _attach_prefix(self, slot: int, token_ids: list[int]) -> int:
        hits = self._hits(token_ids)
        for i, block in enumerate(hits):
            if self._ref[block] == 0:
                del self._free_blocks[block]
            self._ref[block] += 1
            self.block_table[slot, i] = block
        self._blocks[slot] = list(hits)
        self._slot_hashes[slot] = [self._block_hash[b] for b in hits]
        self._counters["prefix_hit_blocks"] += len(hits)
        return len(hits) * self.block_size

    @transaction
    def cache_prefix(self, slot: int, token_ids) -> int:
        """Enter the slot's full blocks among ``token_ids`` (their K/V computed) into the hash map; a block
        whose hash another block already holds stays private, and the chain goes on past it."""
        self._check_open()
        slot = self._check_slot(slot)
        ids = self._check_token_ids(token_ids)
        if not self.prefix_caching:
            return 0
        chain = self._slot_hashes[slot]
        full = min(len(ids), int(self._lengths[slot])) // self.block_size
        if full > len(chain):
            new = self._chain(ids, chain[-1] if chain else _ROOT_HASH, len(chain), full)
            for i, h in enumerate(new, start=len(chain)):
                block = self._blocks[slot][i]
                if h not in self._cached and block not in self._block_hash:
                    self._cached[h] = block
                    self._block_hash[block] = h
                    self._counters["prefix_cached_blocks"] += 1
            chain.extend(new)
            self._cached_tokens[slot] = max(int(self._cached_tokens[slot]), full * self.block_size)
        return int(self._cached_tokens[slot])

    @synchronized
    def prefix_stats(self) -> dict:
        """Prefix cache counters: blocks hit, entered, evicted; cached blocks now; KV bytes copied (none)."""
        c = self._counters
        return {"hit_pages": c["prefix_hit_blocks"], "cached_pages_total": c["prefix_cached_blocks"],
                "evicted_pages": c["prefix_evicted_blocks"], "cached_pages": len(self._cached),
                "kv_bytes_copied": c["kv_bytes_copied"], "page_tokens": self.block_size}

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

    @synchronized
    def stats(self) -> CacheStats:
        used = self.num_blocks - len(self._free_blocks)
        return self._stats(page_bytes=self.block_bytes, total_pages=self.num_blocks, used_pages=used,
                           reclaimable_pages=0)

    @synchronized
    def check_integrity(self) -> None:
        self._check_open()
        problems = []
        refs = np.zeros(self.num_blocks, dtype=np.int64)
        for blocks in self._blocks:
            if len(set(blocks)) != len(blocks):
                problems.append("a slot owns a block twice")
            np.add.at(refs, np.asarray(blocks, dtype=np.int64), 1)
        if not np.array_equal(refs, self._ref):
            problems.append("block reference counts disagree with the slots' blocks")
        queued = np.zeros(self.num_blocks, dtype=bool)
        queued[list(self._free_blocks)] = True
        if len(self._free_blocks) != int(np.count_nonzero(queued)) or not np.array_equal(queued, self._ref == 0):
            problems.append("the free queue is not exactly the blocks nobody owns")
        if len(self._cached) != len(self._block_hash) or any(self._block_hash.get(b) != h
                                                              for h, b in self._cached.items()):
            problems.append("the prefix hash map and the blocks' hashes disagree")
        for s in range(self.num_slots):
            blocks = self._blocks[s]
            if not self._live[s] and (blocks or self._lengths[s]):
                problems.append("free slot %d still owns blocks or a length" % s)
            if len(blocks) < self._blocks_for(self._lengths[s]):
                problems.append("slot %d: %d blocks for %d tokens" % (s, len(blocks), self._lengths[s]))
            if list(self.block_table[s, :len(blocks)]) != blocks:
                problems.append("slot %d: block table row disagrees with its blocks" % s)
            # shared or cached blocks only inside the prefix the slot never writes
            floor = int(self._cached_tokens[s]) // self.block_size
            exposed = [b for b in blocks[floor:] if self._ref[b] > 1 or b in self._block_hash]
            if exposed:
                problems.append("slot %d may write shared or cached blocks %s" % (s, exposed[:5]))
        if problems:
            raise VmemIntegrityError("; ".join(problems))

    @synchronized
    def close(self) -> None:
        if self._closed:
            return
        self._pool = None
        super().close()
