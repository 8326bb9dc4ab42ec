"""Scheduler side: slots, contiguous block ids and admission by physical blocks.

``SlotTable`` is the policy and bookkeeping (pure, tested without vLLM). ``install`` fits it into a
real ``vllm.v1.core.kv_cache_manager.KVCacheManager`` (0.33.0) by replacing bound methods on the
instances, so vLLM's Scheduler, coordinator and BlockPool run unchanged:

    single-type manager .allocate_new_blocks   hands out ids slot*M+1+j instead of popping the free queue
    single-type manager .pop_blocks_for_free   the request gives its slot back (slot drains, see below)
    block pool .free_blocks                    counts blocks coming home per slot
    block pool .get_num_free_blocks / get_usage   report physical capacity, not free virtual ids
    block pool .get_new_blocks                 refuses: any other allocation path would break slot ranges
    manager .allocate_slots                    refuses (returns None) a new request when no slot is free

A slot whose request was freed stays *draining* until all its blocks are back in the pool (vLLM may
return them later than it pops the bookkeeping, e.g. with async scheduling); only then can a new request
take it, so its ids are never handed out twice. Free slots are reused last-freed-first: the worker keeps
a finished request's pages mapped (deferred reclamation), so the next request in that slot maps nothing.
"""

from __future__ import annotations

import logging

import numpy as np

from vmem.errors import VmemInvalidArgument, VmemSlotError
from vmem_vllm.layout import SlotLayout

logger = logging.getLogger(__name__)


class SlotTable:
    """Request -> slot, blocks outstanding per slot, and the physical block budget.

    Invariants (``check()``):
      * a slot is in exactly one state: free, owned by one request, or draining (owner gone, blocks out);
      * outstanding[s] >= 0, and a free slot has none outstanding;
      * sum(outstanding) <= num_physical_blocks.
    """

    def __init__(self, layout: SlotLayout, num_physical_blocks: int):
        if num_physical_blocks <= 0:
            raise VmemInvalidArgument("num_physical_blocks must be positive, got %r" % (num_physical_blocks,))
        self.layout = layout
        self.num_physical_blocks = int(num_physical_blocks)
        self.outstanding = np.zeros(layout.num_slots, dtype=np.int64)
        self._owner: dict[str, int] = {}
        self._draining: set[int] = set()
        self._free = list(range(layout.num_slots - 1, -1, -1))      # a stack: pop() gives slot 0 first

    # ---- queries ----
    def slot_of_request(self, request_id: str) -> int | None:
        return self._owner.get(request_id)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return int(self.outstanding.sum())

    @property
    def num_free_physical_blocks(self) -> int:
        return self.num_physical_blocks - self.num_used_blocks

    def can_admit(self, request_id: str) -> bool:
        return request_id in self._owner or bool(self._free)

    # ---- transitions ----
    def acquire(self, request_id: str) -> int:
        """The request's slot, taking the most recently freed one if it has none yet."""
        slot = self._owner.get(request_id)
        if slot is None:
            if not self._free:
                raise VmemSlotError("all %d slots are owned or draining" % self.layout.num_slots)
            slot = self._free.pop()
            self._owner[request_id] = slot
        return slot

    def take_blocks(self, slot: int, num_blocks: int) -> None:
        if num_blocks > self.num_free_physical_blocks:
            raise VmemInvalidArgument("%d blocks asked, %d physical blocks free"
                                      % (num_blocks, self.num_free_physical_blocks))
        self.outstanding[slot] += num_blocks

    def return_blocks(self, block_ids) -> None:
        """Blocks are back in vLLM's free queue."""
        ids = np.asarray(list(block_ids), dtype=np.int64)
        if ids.size == 0:
            return
        slots = (ids - 1) // self.layout.blocks_per_slot
        np.subtract.at(self.outstanding, slots, 1)
        if (self.outstanding < 0).any():
            raise VmemInvalidArgument("blocks returned twice: %s" % ids.tolist())
        for slot in set(slots.tolist()) & self._draining:
            self._settle(slot)

    def release(self, request_id: str) -> None:
        """The request is finished, aborted or preempted: its slot drains, then becomes free."""
        slot = self._owner.pop(request_id, None)
        if slot is not None:
            self._draining.add(slot)
            self._settle(slot)

    def _settle(self, slot: int) -> None:
        if self.outstanding[slot] == 0:
            self._draining.discard(slot)
            self._free.append(slot)

    def check(self) -> None:
        owned = list(self._owner.values())
        states = owned + list(self._draining) + self._free
        if sorted(states) != list(range(self.layout.num_slots)):
            raise VmemInvalidArgument("slot states overlap or miss slots: owned %s, draining %s, free %s"
                                      % (sorted(owned), sorted(self._draining), sorted(self._free)))
        if (self.outstanding < 0).any() or self.outstanding[self._free].any():
            raise VmemInvalidArgument("bad outstanding counts %s" % self.outstanding.tolist())
        if self.num_used_blocks > self.num_physical_blocks:
            raise VmemInvalidArgument("%d blocks out, budget %d" % (self.num_used_blocks, self.num_physical_blocks))


def install(kv_cache_manager, layout: SlotLayout, num_physical_blocks: int) -> SlotTable:
    """Make a vLLM KVCacheManager hand out slot-contiguous block ids under a physical budget.

    Supported: one KV cache group of full attention, prefix caching off, no speculative lookahead
    beyond ``max_model_len``. Anything else raises VmemInvalidArgument before any state changes.
    """
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    managers = kv_cache_manager.coordinator.single_type_managers
    if len(managers) != 1 or type(managers[0]) is not FullAttentionManager:
        raise VmemInvalidArgument("vmem's vLLM plugin needs one KV cache group of full attention, got %s"
                                  % [type(m).__name__ for m in managers])
    if kv_cache_manager.enable_caching:
        raise VmemInvalidArgument("vmem's vLLM plugin needs prefix caching off (--no-enable-prefix-caching)")
    pool = kv_cache_manager.block_pool
    if pool.num_gpu_blocks < layout.num_virtual_blocks:
        raise VmemInvalidArgument("the block pool has %d block ids, the slot layout needs %d"
                                  % (pool.num_gpu_blocks, layout.num_virtual_blocks))
    mgr = managers[0]
    table = SlotTable(layout, num_physical_blocks)
    m = layout.blocks_per_slot

    def allocate_new_blocks(request_id, num_tokens, num_tokens_main_model=None):
        req_blocks = mgr.req_to_blocks[request_id]
        num_required = -(-num_tokens // mgr.block_size)
        first, end = len(req_blocks), min(num_required, m)
        if end <= first:
            return []
        slot = table.acquire(request_id)
        table.take_blocks(slot, end - first)
        ids = layout.block_ids(slot, first, end)
        blocks = [pool.blocks[i] for i in ids]
        for block in blocks:
            if block.ref_cnt != 0:
                raise VmemInvalidArgument("block %d of slot %d is still in use" % (block.block_id, slot))
            pool.free_block_queue.remove(block)
            block.ref_cnt = 1
        req_blocks.extend(blocks)
        if mgr.records_new_block_ids:
            mgr.new_block_ids.extend(ids)
        return blocks

    orig_pop = mgr.pop_blocks_for_free

    def pop_blocks_for_free(request_id):
        blocks = orig_pop(request_id)
        table.release(request_id)
        return blocks

    orig_free_blocks = pool.free_blocks

    def free_blocks(ordered_blocks):
        blocks = [b for b in ordered_blocks if not b.is_null]
        orig_free_blocks(blocks)
        table.return_blocks(b.block_id for b in blocks if b.ref_cnt == 0)

    orig_num_free = pool.get_num_free_blocks

    def get_num_free_blocks():
        return min(orig_num_free(), table.num_free_physical_blocks)

    def get_usage():
        return table.num_used_blocks / table.num_physical_blocks

    def get_new_blocks(num_blocks):
        # Any other path that pops the free queue would hand out another slot's ids: refuse loudly.
        raise VmemInvalidArgument("BlockPool.get_new_blocks(%d) outside a slot: a vLLM feature vmem's plugin does "
                                  "not support (prefix caching, KV connectors, ...)" % num_blocks)

    orig_allocate_slots = kv_cache_manager.allocate_slots

    def allocate_slots(request, num_new_tokens, *args, **kwargs):
        if not table.can_admit(request.request_id):
            return None
        return orig_allocate_slots(request, num_new_tokens, *args, **kwargs)

    # vLLM sizes its admission watermark from the block count, which is now virtual: scale it to physical
    kv_cache_manager.watermark_blocks = kv_cache_manager.watermark_blocks * num_physical_blocks // pool.num_gpu_blocks
    mgr.allocate_new_blocks = allocate_new_blocks
    mgr.pop_blocks_for_free = pop_blocks_for_free
    pool.free_blocks = free_blocks
    pool.get_num_free_blocks = get_num_free_blocks
    pool.get_usage = get_usage
    pool.get_new_blocks = get_new_blocks
    kv_cache_manager.allocate_slots = allocate_slots
    kv_cache_manager.vmem_slots = table
    logger.info("vmem: %d slots x %d blocks (virtual ids 1..%d), %d physical blocks",
                layout.num_slots, m, layout.num_virtual_blocks - 1, num_physical_blocks)
    return table


class ReclaimTracker:
    """Prefix caching on: vLLM's own BlockPool hands out block ids; this notes which of them hold nothing
    vLLM may read again (free and not cached: a request's partial last block, blocks evicted from the
    prefix cache, everything after ``reset_prefix_cache``), so the workers can give their memory back.

    ``max_cached_blocks`` (``VMEM_VLLM_CACHED_BLOCKS``; None: as many as vLLM keeps) bounds the blocks
    that hold only cached K/V (free, hashed): past it, the least recently freed are evicted from vLLM's
    prefix cache (vLLM's own eviction call) and reported, so idle cache stops pinning memory.

    Invariants: a reported block had ref_cnt 0 and no prefix-cache hash when reported; cached blocks
    are never reported (vLLM may hand them to a new request as a prefix hit, with their K/V).
    """

    def __init__(self, pool, max_cached_blocks: int | None = None, evict=None):
        if max_cached_blocks is not None and max_cached_blocks < 0:
            raise VmemInvalidArgument("max_cached_blocks must be >= 0, got %r" % (max_cached_blocks,))
        self.pool = pool
        self.max_cached_blocks = max_cached_blocks
        self._evict = evict              # vLLM's BlockPool._maybe_evict_cached_block, unwrapped
        self._pending: set[int] = set()
        self._cached_lru: dict[int, None] = {}     # free hashed blocks, least recently freed first
        self.num_reported = 0
        self.num_capped = 0

    def _is_cached_free(self, block) -> bool:
        return block.ref_cnt == 0 and (block.block_hash is not None
                                       or block.block_id in self.pool.cached_block_hashes_by_block)

    def note(self, block_ids) -> None:
        self._pending.update(block_ids)

    def note_freed(self, blocks) -> None:
        """Blocks that just reached ref_cnt 0 (in vLLM's eviction order)."""
        for b in blocks:
            if self._is_cached_free(b):
                self._cached_lru.pop(b.block_id, None)
                self._cached_lru[b.block_id] = None
            else:
                self._pending.add(b.block_id)

    def _cap(self) -> None:
        if self.max_cached_blocks is None or len(self._cached_lru) <= self.max_cached_blocks:
            return
        for block_id in list(self._cached_lru):        # drop entries reused or evicted meanwhile
            if not self._is_cached_free(self.pool.blocks[block_id]):
                del self._cached_lru[block_id]
        while len(self._cached_lru) > self.max_cached_blocks:
            block_id = next(iter(self._cached_lru))
            del self._cached_lru[block_id]
            (self._evict or self.pool._maybe_evict_cached_block)(self.pool.blocks[block_id])
            self._pending.add(block_id)
            self.num_capped += 1

    def take(self) -> list[int]:
        """Block ids that became reclaimable since the last call (sorted)."""
        self._cap()
        pool = self.pool
        hashed = pool.cached_block_hashes_by_block
        out = sorted(b for b in self._pending
                     if b != 0 and pool.blocks[b].ref_cnt == 0 and pool.blocks[b].block_hash is None
                     and b not in hashed)
        self._pending.clear()
        self.num_reported += len(out)
        return out


def install_blocks(kv_cache_manager, max_cached_blocks: int | None = None) -> ReclaimTracker:
    """Prefix caching on: vLLM keeps its block pool, ids and eviction order; wrap the pool methods that
    let blocks go so the tracker sees them. The scheduler's ``schedule`` puts ``take()`` on each
    SchedulerOutput as ``vmem_reclaim`` (``__init__._patch_scheduler``)."""
    pool = kv_cache_manager.block_pool
    orig_free_blocks = pool.free_blocks
    orig_evict = pool._maybe_evict_cached_block
    orig_reset = pool.reset_prefix_cache
    tracker = ReclaimTracker(pool, max_cached_blocks, evict=orig_evict)

    def free_blocks(ordered_blocks):
        blocks = list(ordered_blocks)
        orig_free_blocks(blocks)
        tracker.note_freed([b for b in blocks if b.ref_cnt == 0 and not b.is_null])

    def maybe_evict_cached_block(block):
        evicted = orig_evict(block)
        if evicted:
            tracker.note((block.block_id,))
        return evicted

    def reset_prefix_cache(*args, **kwargs):
        done = orig_reset(*args, **kwargs)
        if done:
            tracker.note(range(1, pool.num_gpu_blocks))
        return done

    pool.free_blocks = free_blocks
    pool._maybe_evict_cached_block = maybe_evict_cached_block
    pool.reset_prefix_cache = reset_prefix_cache
    kv_cache_manager.vmem_blocks = tracker
    logger.info("vmem: prefix caching on, vLLM's block pool of %d blocks, mapped per block, cached blocks kept: %s",
                pool.num_gpu_blocks - 1, "all vLLM keeps" if max_cached_blocks is None else max_cached_blocks)
    return tracker
