"""Worker side: the KV cache's virtual range and the pages under the blocks that live requests hold.

Rationale: vLLM allocates the KV cache with ``torch.zeros`` (it would touch, hence back, every byte).
Here the same bytes are a vmem reservation; a block's pages are mapped when a request first gets the
block (the scheduler output says which, before the forward that writes it) and recycled afterwards.

Approach: the pool is cut into *physical blocks* of ``pages_per_block`` consecutive pool pages, one per
block's worth of memory, so a block maps in one run and neighbouring blocks of one slot tend to merge
into one OS mapping. Block 0 (vLLM's null block, where padded block-table entries point) stays mapped.
Reclamation is deferred: a finished request's blocks stay mapped; a new request in the same slot gets
the same ids (SlotTable reuses slots last-freed-first) and maps nothing. Idle mapped blocks are taken
back only when the pool runs dry, tail blocks of a slot first (``reclaim="eager"`` unmaps at once).

Invariants (``check_integrity()``):
  * every live block is mapped; a physical block backs at most one virtual block;
  * free + mapped == physical blocks (block 0's is separate);
  * the backend's own page table reads back exactly what ``_phys`` says.

Limitations: CUDA unmaps wait for the current stream first (an in-flight kernel may still read the page);
that happens only when the pool runs dry or with eager reclamation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from vmem.errors import VmemIntegrityError, VmemInvalidArgument, VmemOutOfMemory
from vmem_vllm.layout import BlockPages, SlotLayout

logger = logging.getLogger(__name__)

RECLAIM_MODES = ("deferred", "eager")


class BlockMapper:
    """Maps pages under vLLM block ids; the K/V tensors are views of ``self.reservation``.

    ``block_pages``: which pages a block spans; ``layout``: slot arithmetic (for the reclaim order);
    ``num_physical_blocks``: blocks the pool backs at once (the scheduler admits no more).
    """

    def __init__(self, backend, block_pages: BlockPages, layout: SlotLayout, num_physical_blocks: int,
                 reclaim: str = "deferred"):
        if reclaim not in RECLAIM_MODES:
            raise VmemInvalidArgument("reclaim must be one of %s, got %r" % (RECLAIM_MODES, reclaim))
        if block_pages.num_blocks < layout.num_virtual_blocks:
            raise VmemInvalidArgument("the tensors hold %d blocks, the slot layout needs %d"
                                      % (block_pages.num_blocks, layout.num_virtual_blocks))
        self.backend = backend
        self.block_pages = block_pages
        self.layout = layout
        self.reclaim = reclaim
        self.num_physical_blocks = int(num_physical_blocks)
        ppb = block_pages.pages_per_block
        page = block_pages.page_bytes
        num_bytes = -(-block_pages.num_bytes // page) * page
        self.reservation = backend.reserve(num_bytes, page)
        try:
            self.pool = backend.create_pool(page, (self.num_physical_blocks + 1) * ppb)
        except BaseException:
            self.reservation.close()
            raise
        self._phys = np.full(block_pages.num_blocks, -1, dtype=np.int64)   # physical block under each block
        self._live = np.zeros(block_pages.num_blocks, dtype=np.int32)      # requests holding each block
        self._free_phys = list(range(self.num_physical_blocks, 0, -1))      # a stack; 0 backs the null block
        self._req_blocks: dict[str, list[int]] = {}
        self._newly_live: list[int] = []     # blocks that became live since the last sync
        self._newly_idle: list[int] = []     # blocks that became idle since the last sync
        self.counters = dict(map_calls=0, unmap_calls=0, blocks_mapped=0, blocks_unmapped=0, blocks_reused=0)
        self._map_blocks(np.array([0], dtype=np.int64), np.array([0], dtype=np.int64))

    # ---- bookkeeping of live requests (no OS calls) ----
    def update(self, *, removed: Iterable[str] = (), assigned: Mapping[str, list[int]] | None = None,
               appended: Mapping[str, list[int]] | None = None) -> list[tuple[str, list[int]]]:
        """Requests ``removed`` (finished / preempted) drop their blocks; ``assigned`` ones get exactly
        these block ids (new or resumed requests); ``appended`` ones grow by these ids.
        Returns the undo log of the additions: [(request id, its blocks before)]."""
        undo = []
        for req_id in removed:
            self._set_blocks(req_id, [])
        for req_id, ids in (assigned or {}).items():
            undo.append((req_id, self._req_blocks.get(req_id, [])))
            self._set_blocks(req_id, list(ids))
        for req_id, ids in (appended or {}).items():
            if ids:
                old = self._req_blocks.get(req_id, [])
                undo.append((req_id, old))
                self._set_blocks(req_id, old + list(ids))
        return undo

    def _set_blocks(self, req_id: str, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 1 or arr.max() >= self.layout.num_virtual_blocks):
            raise VmemInvalidArgument("block ids of %r outside [1, %d): %s"
                                      % (req_id, self.layout.num_virtual_blocks, ids))
        old = self._req_blocks.pop(req_id, [])
        old_arr = np.asarray(old, dtype=np.int64)
        np.subtract.at(self._live, old_arr, 1)
        if arr.size:
            kept = set(old)
            self._newly_live.extend(b for b in arr[self._live[arr] == 0].tolist() if b not in kept)
            np.add.at(self._live, arr, 1)
            self._req_blocks[req_id] = list(ids)
        self._newly_idle.extend(old_arr[self._live[old_arr] == 0].tolist())

    def apply(self, *, removed: Iterable[str] = (), assigned: Mapping[str, list[int]] | None = None,
              appended: Mapping[str, list[int]] | None = None) -> None:
        """``update`` then ``sync``. If the new blocks cannot be mapped (VmemOutOfMemory, a driver error)
        the additions are undone and every block still live keeps its pages; removals are facts (the
        scheduler finished those requests) and stay. Work is proportional to the blocks that changed."""
        undo = []
        try:
            undo = self.update(removed=removed, assigned=assigned, appended=appended)
            self.sync()
        except BaseException:
            for req_id, old in reversed(undo):
                self._set_blocks(req_id, old)
            self._newly_live.clear()
            raise

    def apply_scheduler_output(self, scheduler_output) -> None:
        """Read a vLLM ``SchedulerOutput`` (first KV cache group) and map what its forward will write."""
        removed = set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())
        assigned = {r.req_id: r.block_ids[0] for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        appended = {}
        for req_id, new_ids in zip(cached.req_ids, cached.new_block_ids):
            ids = list(new_ids[0]) if new_ids is not None else []
            if req_id in cached.resumed_req_ids:
                assigned[req_id] = ids
            else:
                appended[req_id] = ids
        self.apply(removed=removed, assigned=assigned, appended=appended)

    # ---- mapping (talks to the OS / driver) ----
    def sync(self) -> None:
        """Map the blocks that became live and are not mapped, in one call; reclaim idle blocks only if
        the pool is short (eager: unmap the blocks that became idle)."""
        fresh = np.unique(np.asarray(self._newly_live, dtype=np.int64))
        idle = np.unique(np.asarray(self._newly_idle, dtype=np.int64))
        self._newly_live.clear()
        self._newly_idle.clear()
        fresh = fresh[self._live[fresh] > 0]
        if self.reclaim == "eager":
            self._unmap_blocks(idle[(self._live[idle] == 0) & (self._phys[idle] >= 0)])
        mapped = self._phys[fresh] >= 0
        self.counters["blocks_reused"] += int(np.count_nonzero(mapped))
        need = fresh[~mapped]
        if need.size == 0:
            return
        shortfall = need.size - len(self._free_phys)
        if shortfall > 0:
            victims = self._reclaim_order()[:shortfall]
            if victims.size < shortfall:
                ppb = self.block_pages.pages_per_block
                raise VmemOutOfMemory(
                    "%d blocks to map, %d physical blocks free and %d idle: the scheduler admitted more "
                    "than the pool holds" % (need.size, len(self._free_phys), victims.size), op="map",
                    needed_pages=int(need.size) * ppb, free_pages=(len(self._free_phys) + victims.size) * ppb)
            self._unmap_blocks(victims)
        phys = np.array([self._free_phys.pop() for _ in range(need.size)], dtype=np.int64)
        try:
            self._map_blocks(need, phys)
        except BaseException:
            self._free_phys.extend(phys[::-1].tolist())
            raise

    def _reclaim_order(self) -> np.ndarray:
        """Idle mapped blocks, the ones deepest into their slot first (prefixes stay for reuse)."""
        idle = np.flatnonzero((self._phys >= 0) & (self._live == 0))
        idle = idle[idle != 0]
        depth = (idle - 1) % self.layout.blocks_per_slot
        return idle[np.lexsort((idle, -depth))]

    def _map_blocks(self, blocks: np.ndarray, phys: np.ndarray) -> None:
        ppb = self.block_pages.pages_per_block
        virt = self.block_pages.pages(blocks)
        phys_pages = (phys.reshape(-1, 1) * ppb + np.arange(ppb, dtype=np.int64)).reshape(-1)
        self.reservation.map(virt, self.pool, phys_pages)
        self._phys[blocks] = phys
        self.counters["map_calls"] += 1
        self.counters["blocks_mapped"] += int(blocks.size)
        logger.debug("vmem: mapped %d blocks", blocks.size)

    def _unmap_blocks(self, blocks: np.ndarray) -> None:
        if blocks.size == 0:
            return
        if self.reservation.backend.name == "cuda":
            torch.cuda.current_stream(self.backend.device).synchronize()
        self.reservation.unmap(self.block_pages.pages(blocks))
        self._free_phys.extend(self._phys[blocks][::-1].tolist())
        self._phys[blocks] = -1
        self.counters["unmap_calls"] += 1
        self.counters["blocks_unmapped"] += int(blocks.size)
        logger.debug("vmem: unmapped %d blocks", blocks.size)

    # ---- queries ----
    def is_mapped(self, block_id: int) -> bool:
        return bool(self._phys[block_id] >= 0)

    def stats(self) -> dict:
        mapped = int(np.count_nonzero(self._phys >= 0)) - 1            # without the null block
        live = int(np.count_nonzero(self._live > 0))
        return dict(physical_blocks=self.num_physical_blocks, mapped_blocks=mapped, live_blocks=live,
                    reclaimable_blocks=mapped - live, free_blocks=len(self._free_phys),
                    pages_per_block=self.block_pages.pages_per_block, page_bytes=self.block_pages.page_bytes,
                    live_requests=len(self._req_blocks), **self.counters)

    def check_integrity(self) -> None:
        problems = []
        mapped = self._phys >= 0
        if ((self._live > 0) & ~mapped).any():
            problems.append("live blocks not mapped: %s" % np.flatnonzero((self._live > 0) & ~mapped)[:8].tolist())
        used = self._phys[mapped]
        if np.unique(used).size != used.size:
            problems.append("a physical block backs two blocks")
        if len(self._free_phys) + used.size - 1 != self.num_physical_blocks:
            problems.append("free %d + mapped %d != %d physical blocks"
                            % (len(self._free_phys), used.size - 1, self.num_physical_blocks))
        table = self.reservation.mapping()
        expect = np.full(self.reservation.num_pages, -1, dtype=np.int64)
        blocks = np.flatnonzero(mapped)
        ppb = self.block_pages.pages_per_block
        expect[self.block_pages.pages(blocks)] = (self._phys[blocks].reshape(-1, 1) * ppb
                                                  + np.arange(ppb)).reshape(-1)
        if not np.array_equal(table, expect):
            bad = np.flatnonzero(table != expect)
            problems.append("backend page table disagrees at %d pages, e.g. page %d: %d vs %d"
                            % (bad.size, bad[0], table[bad[0]], expect[bad[0]]))
        if problems:
            raise VmemIntegrityError("; ".join(problems))

    def close(self) -> None:
        self.reservation.close()
        self.pool.close()
