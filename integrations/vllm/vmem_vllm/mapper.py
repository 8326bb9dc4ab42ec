"""Worker side: the KV cache's virtual range and the pages under the blocks that live requests hold.

Rationale: vLLM allocates the KV cache with ``torch.zeros`` (it would touch, hence back, every byte).
Here the same bytes are a vmem reservation; a block's pages are mapped when a request first gets the
block (the scheduler output says which, before the forward that writes it) and recycled afterwards.

Approach: the mapping itself is vmem's mapping core (vmem/allocator/mapping.py: PageMapper, the page
table, placement, the one CUDA-safe unmap, the reclaim modes and slot order of policy.py), the same
one VirtualKVCache uses; this module only knows vLLM's block ids. A block's pages are placed by
place_pages so that runs of virtual pages continue their neighbours' pool runs and merge into one OS
mapping. Block 0 (vLLM's null block, where padded block-table entries point) stays mapped.
Reclamation is deferred: a finished request's blocks stay mapped; a new request in the same slot gets
the same ids (SlotTable reuses slots last-freed-first) and maps nothing. Idle mapped blocks are taken
back only when the pool runs dry: idle slots first in ReclaimPolicy order ("lru": the slot idle the
longest), then slots whose request leaves blocks unused, the deepest blocks of a slot first
(``reclaim="eager"`` unmaps at once and returns the memory to the OS).

Invariants (``check_integrity()``):
  * the mapping core's (PageMapper.check): the page table is consistent and the backend's own table,
    mapping count and resident bytes agree with it;
  * every live block is mapped, whole; a pool page backs at most one virtual page;
  * free + mapped == physical blocks (block 0's are separate).

Memory back to the OS: ``release()`` unmaps idle blocks and trims their pool pages at once (the worker
calls it for the blocks vLLM no longer keeps, worker.py: Elasticity).

Limitations: before an unmap the whole CUDA device is synchronised (an in-flight kernel on any stream
may still read the page); that happens only when the pool runs dry or with eager reclamation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np

from vmem.allocator.mapping import PageMapper, check_reclaim_mode
from vmem.allocator.page_table import UNMAPPED, place_pages
from vmem.allocator.policy import get_reclaim_policy, reclaim_slot_order
from vmem.errors import VmemError, VmemIntegrityError, VmemInvalidArgument, VmemOutOfMemory
from vmem_vllm.layout import BlockPages, SlotLayout

logger = logging.getLogger(__name__)


class BlockMapper:
    """Maps pages under vLLM block ids; the K/V tensors are views of ``self.reservation``.

    ``block_pages``: which pages a block spans; ``layout``: slot arithmetic (for the reclaim order);
    ``num_physical_blocks``: blocks the pool backs at once (the scheduler admits no more);
    ``reclaim``: "deferred" | "eager"; ``reclaim_policy``: "lru" | "fewest" (policy.py).
    ``per_block``: the ids come from vLLM's own block pool (prefix caching on), set by the worker.
    """

    per_block = False

    def __init__(self, backend, block_pages: BlockPages, layout: SlotLayout, num_physical_blocks: int,
                 reclaim: str = "deferred", reclaim_policy="lru"):
        self.reclaim = check_reclaim_mode(reclaim)
        self.reclaim_policy = get_reclaim_policy(reclaim_policy)
        if block_pages.num_blocks < layout.num_virtual_blocks:
            raise VmemInvalidArgument("the tensors hold %d blocks, the slot layout needs %d"
                                      % (block_pages.num_blocks, layout.num_virtual_blocks))
        self.backend = backend
        self.block_pages = block_pages
        self.layout = layout
        self.num_physical_blocks = int(num_physical_blocks)
        ppb = block_pages.pages_per_block
        page = block_pages.page_bytes
        num_bytes = -(-block_pages.num_bytes // page) * page
        self.reservation = backend.reserve(num_bytes, page)
        try:
            num_pool_pages = (self.num_physical_blocks + 1) * ppb
            self.pool = backend.create_pool(page, num_pool_pages)
            self._page_counters = {}
            self._pages = PageMapper(backend, self.reservation, self.pool, num_pool_pages, self._page_counters)
        except BaseException:
            if getattr(self, "pool", None) is not None:
                self.pool.close()
            self.reservation.close()
            raise
        self._live = np.zeros(block_pages.num_blocks, dtype=np.int32)      # requests holding each block
        self._slot_live = np.zeros(layout.num_slots, dtype=np.int64)        # live blocks of each slot
        self._freed_at = np.zeros(layout.num_slots, dtype=np.int64)         # clock when a slot last went idle
        self._clock = 0
        self._req_blocks: dict[str, list[int]] = {}
        self._newly_live: list[int] = []     # blocks that became live since the last sync
        self._newly_idle: list[int] = []     # blocks that became idle since the last sync
        self._blocks_reused = 0
        self._blocks_released = 0
        self._map_blocks(np.array([0], dtype=np.int64))

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
        np.subtract.at(self._slot_live, self._slot_of(old_arr), 1)
        if arr.size:
            kept = set(old)
            self._newly_live.extend(b for b in arr[self._live[arr] == 0].tolist() if b not in kept)
            np.add.at(self._live, arr, 1)
            np.add.at(self._slot_live, self._slot_of(arr), 1)
            self._req_blocks[req_id] = list(ids)
        self._newly_idle.extend(old_arr[self._live[old_arr] == 0].tolist())
        went_idle = np.unique(self._slot_of(old_arr))
        went_idle = went_idle[self._slot_live[went_idle] == 0]
        if went_idle.size:
            self._clock += 1
            self._freed_at[went_idle] = self._clock

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
            elif ids:
                appended[req_id] = ids
        if removed or assigned or appended:       # most decode steps change nothing
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
            self._unmap_blocks(idle[(self._live[idle] == 0) & self._mapped(idle)], trim=True)
        mapped = self._mapped(fresh)
        self._blocks_reused += int(np.count_nonzero(mapped))
        need = fresh[~mapped]
        if need.size == 0:
            return
        free = self._num_free_blocks
        shortfall = need.size - free
        if shortfall > 0:
            victims = self._victims(shortfall)
            if victims.size < shortfall:
                ppb = self.block_pages.pages_per_block
                raise VmemOutOfMemory(
                    "%d blocks to map, %d physical blocks free and %d idle: the scheduler admitted more "
                    "than the pool holds" % (need.size, free, victims.size), op="map",
                    needed_pages=int(need.size) * ppb, free_pages=(free + victims.size) * ppb)
            self._unmap_blocks(victims, trim=False)
        self._map_blocks(need)

    def release(self, block_ids=None) -> int:
        """Give idle blocks' memory back to the OS now: unmap ``block_ids`` ([n] ints; None: every idle
        mapped block) that no request holds and trim their pool pages (host: the memfd's blocks are
        punched out). Live blocks, unmapped ones and the null block are skipped. Returns how many
        blocks were released."""
        if block_ids is None:
            ids = np.arange(1, self.block_pages.num_blocks, dtype=np.int64)
        else:
            ids = np.unique(np.asarray(list(block_ids), dtype=np.int64))
            ids = ids[(ids > 0) & (ids < self.block_pages.num_blocks)]
        ids = ids[(self._live[ids] == 0) & self._mapped(ids)]
        if ids.size:
            self._unmap_blocks(ids, trim=True)
            self._blocks_released += int(ids.size)
        return int(ids.size)

    def _victims(self, num_blocks: int) -> np.ndarray:
        """Up to ``num_blocks`` idle mapped blocks to take back, in reclaim_slot_order, deepest first."""
        lay = self.layout
        ids = 1 + np.arange(lay.num_slots * lay.blocks_per_slot, dtype=np.int64)
        mapped = self._mapped(ids).reshape(lay.num_slots, lay.blocks_per_slot)
        idle_mapped = mapped & (self._live[ids] == 0).reshape(mapped.shape)
        excess = idle_mapped.sum(axis=1)
        holds, busy = excess > 0, self._slot_live > 0
        order = reclaim_slot_order(self.reclaim_policy, np.flatnonzero(holds & ~busy), np.flatnonzero(holds & busy),
                                   excess, mapped.sum(axis=1), self._freed_at)
        victims, left = [], num_blocks
        for slot in order:
            if left <= 0:
                break
            deepest = np.flatnonzero(idle_mapped[slot])[::-1][:left]
            victims.append(ids[slot * lay.blocks_per_slot + deepest])
            left -= deepest.size
        return np.concatenate(victims) if victims else np.zeros(0, dtype=np.int64)

    def _map_blocks(self, blocks: np.ndarray) -> None:
        """Map ``blocks`` ([n] int64, unique, unmapped) in one call. Each maximal run of consecutive virtual
        pages is a placement row that continues the pool run of the page before it where it can."""
        table = self._pages.table
        virt = np.sort(self.block_pages.pages(blocks))
        cuts = np.flatnonzero(np.diff(virt) != 1) + 1
        starts = np.concatenate(([0], cuts))
        counts = np.diff(np.concatenate((starts, [virt.size])))
        before = virt[starts] - 1
        lasts = np.where(before >= 0, table.phys[np.maximum(before, 0)], UNMAPPED).astype(np.int64)
        phys = place_pages(table.refcount == 0, lasts, counts)
        try:
            self._pages.map(virt, phys)
        except VmemError:
            try:                               # the native call rolled back; pages it populated go back
                self._pages.trim(phys)
            except VmemError as exc:
                logger.warning("trim after a failed map failed: %s", exc)
            raise
        logger.debug("vmem: mapped %d blocks", blocks.size)

    def _unmap_blocks(self, blocks: np.ndarray, *, trim: bool) -> None:
        if blocks.size == 0:
            return
        released = self._pages.unmap(self.block_pages.pages(blocks))
        if trim:
            self._pages.trim(released)
        logger.debug("vmem: unmapped %d blocks", blocks.size)

    # ---- queries ----
    def _slot_of(self, block_ids: np.ndarray) -> np.ndarray:
        return (block_ids - 1) // self.layout.blocks_per_slot

    def _mapped(self, block_ids: np.ndarray) -> np.ndarray:
        """[n] bool: whether each block is mapped (blocks map whole, so its first page tells)."""
        first = np.asarray(block_ids, dtype=np.int64) * self.block_pages.stride_pages + self.block_pages.base_pages[0]
        return self._pages.table.phys[first] != UNMAPPED

    @property
    def _num_free_blocks(self) -> int:
        return self._pages.table.num_free // self.block_pages.pages_per_block

    @property
    def num_live_requests(self) -> int:
        return len(self._req_blocks)

    def is_mapped(self, block_id: int) -> bool:
        return bool(self._mapped(np.array([block_id]))[0])

    @property
    def counters(self) -> dict:
        ppb, c = self.block_pages.pages_per_block, self._page_counters
        return dict(map_calls=c["map_calls"], unmap_calls=c["unmap_calls"], blocks_mapped=c["pages_mapped"] // ppb,
                    blocks_unmapped=c["pages_unmapped"] // ppb, blocks_reused=self._blocks_reused,
                    blocks_released=self._blocks_released)

    def stats(self) -> dict:
        ppb = self.block_pages.pages_per_block
        mapped = self._pages.table.num_mapped_virtual // ppb - 1        # without the null block
        live = int(np.count_nonzero(self._live > 0))
        return dict(physical_blocks=self.num_physical_blocks, mapped_blocks=mapped, live_blocks=live,
                    reclaimable_blocks=mapped - live, free_blocks=self._num_free_blocks,
                    pages_per_block=ppb, page_bytes=self.block_pages.page_bytes,
                    live_requests=len(self._req_blocks), **self.counters)

    def check_integrity(self) -> None:
        problems = self._pages.check()
        table, ppb = self._pages.table, self.block_pages.pages_per_block
        mapped = self._mapped(np.arange(self.block_pages.num_blocks, dtype=np.int64))
        num_mapped = int(np.count_nonzero(mapped))
        if (table.phys[self.block_pages.pages(np.flatnonzero(mapped))] == UNMAPPED).any() \
                or table.num_mapped_virtual != num_mapped * ppb:
            problems.append("a block is mapped in part")
        if ((self._live > 0) & ~mapped).any():
            problems.append("live blocks not mapped: %s" % np.flatnonzero((self._live > 0) & ~mapped)[:8].tolist())
        if not mapped[0]:
            problems.append("the null block is not mapped")
        if np.any(table.refcount > 1):
            problems.append("a pool page backs two virtual pages")
        if self._num_free_blocks + num_mapped - 1 != self.num_physical_blocks:
            problems.append("free %d + mapped %d != %d physical blocks"
                            % (self._num_free_blocks, num_mapped - 1, self.num_physical_blocks))
        if problems:
            raise VmemIntegrityError("; ".join(problems))

    def close(self) -> None:
        self.reservation.close()
        self.pool.close()
