"""Column planning of VirtualKVCache: what a step grows, what it may take back, and the records of both.

Pure: nothing here calls the backend. A slot's memory is counted in *columns*: column j of slot s is
page j of every row of s (spec.slot_virtual_pages), so a slot with ``columns[s] = c`` maps pages
``[0, c)`` of each of its ``rows_per_slot`` rows::

    row 0 of slot s:  | c0 | c1 | c2 | .. | c(c-1) |  unmapped ...      columns[s] = c
    row 1 of slot s:  | c0 | c1 | c2 | .. | c(c-1) |  unmapped ...
                       [0, shared[s])   shared with another slot: never reclaimed
                       [0, cached[s])   pages of the prefix index (prefix.py): freed only by evicting
                                        them from the index, never by shrinking the slot
                       [0, protected)   cover the live length (or a pending step): never reclaimed
                                        [protected, c)  reclaimable, tail first

The records (Growth, Reclaim, SlotColumns) are what a change needs to be applied and undone: the
cache applies and undoes them in one place (cache.py ``_apply_*`` / ``_undo_*``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from vmem.allocator.page_table import UNMAPPED, PageTable, place_pages
from vmem.allocator.policy import ReclaimPolicy, reclaim_slot_order
from vmem.allocator.spec import KVCacheSpec


class SlotColumns(NamedTuple):
    """One slot's column counts, as saved before a reclaim (so it can be undone)."""
    columns: int
    inherited: int
    shared: int
    cached: int


class Growth(NamedTuple):
    """Slots ``slots[i]`` grow from ``first[i]`` to ``end[i]`` columns ([n] int64 each); their new pages
    are ``virt`` -> ``phys`` ([m] int64 each, row after row)."""
    slots: np.ndarray
    first: np.ndarray
    end: np.ndarray
    virt: np.ndarray
    phys: np.ndarray

    @property
    def num_pages(self) -> int:
        return int(self.virt.size)


class Reclaim(NamedTuple):
    """Slots shrink to ``keep[s]`` columns; ``before[s]`` is what they had; the pages taken back are
    ``virt`` -> ``phys`` ([m] int64 each; phys as mapped before the unmap)."""
    keep: dict[int, int]
    before: dict[int, SlotColumns]
    virt: np.ndarray
    phys: np.ndarray

    @property
    def num_pages(self) -> int:
        return int(self.virt.size)


class ColumnPlanner:
    """Per-slot column state and the pure planning over it.

    columns [max_batch] int64: mapped columns of each slot; inherited: columns a request found mapped in
    its slot (counts reuse); shared: leading columns shared with another slot; cached: leading columns
    that map prefix-index pages (the cache keeps which nodes); freed_at: a clock value
    at each slot's last free (ReclaimPolicy order). ``live`` and ``lengths`` ([max_batch] bool / int64)
    are the slot bookkeeping's arrays, read, never written.
    """

    def __init__(self, spec: KVCacheSpec, live: np.ndarray, lengths: np.ndarray, reclaim_policy: ReclaimPolicy):
        n = spec.max_batch
        self.spec = spec
        self.live = live
        self.lengths = lengths
        self.reclaim_policy = reclaim_policy
        self.columns = np.zeros(n, dtype=np.int64)
        self.inherited = np.zeros(n, dtype=np.int64)
        self.shared = np.zeros(n, dtype=np.int64)
        self.cached = np.zeros(n, dtype=np.int64)
        self.freed_at = np.zeros(n, dtype=np.int64)

    def growth(self, slots: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slots that grow, their columns now, columns wanted), [k] int64 each, for needs (slots, tokens)."""
        target = self.spec.row_pages_for_tokens_array(tokens)
        current = self.columns[slots]
        grows = target > current
        return slots[grows], current[grows], target[grows]

    def pages_to_map(self, slots: np.ndarray, tokens: np.ndarray) -> int:
        _, current, target = self.growth(slots, tokens)
        return int((target - current).sum()) * self.spec.rows_per_slot

    def protected(self, slots: np.ndarray | None = None, tokens: np.ndarray | None = None) -> np.ndarray:
        """[max_batch] int64: columns each slot must keep: those covering a live slot's length, or the
        tokens a pending step(needs) asks for, shared columns and cached columns (the index frees those);
        every other mapped column is reclaimable (and its pages have no other reference, so reclaiming it
        frees exactly its pages)."""
        row_pages = self.spec.row_pages_for_tokens_array
        protected = np.where(self.live, row_pages(self.lengths), 0)
        protected = np.maximum(np.maximum(protected, self.shared), self.cached)
        if slots is not None and slots.size:
            protected[slots] = np.maximum(protected[slots], row_pages(tokens))
        return protected

    def reclaimable_pages(self, protected: np.ndarray | None = None) -> int:
        protected = self.protected() if protected is None else protected
        return int(np.maximum(self.columns - protected, 0).sum()) * self.spec.rows_per_slot

    def reused_pages(self, slots: np.ndarray, tokens: np.ndarray) -> int:
        """Pages step(slots -> tokens) finds already mapped, left in the slots by an earlier request."""
        row_pages = self.spec.row_pages_for_tokens_array
        inherited = self.inherited[slots]
        had = np.minimum(row_pages(self.lengths[slots]), inherited)
        return int(np.maximum(np.minimum(row_pages(tokens), inherited) - had, 0).sum()) * self.spec.rows_per_slot

    def plan_reclaim(self, shortfall_pages: int, protected: np.ndarray) -> dict[int, int]:
        """{slot: columns it keeps} freeing at least ``shortfall_pages`` pages.

        Idle slots first, in ReclaimPolicy order; then the unused tail columns of live slots (a request
        that inherited a longer one's pages in a deferred slot), largest tail first. Tail columns go first.
        """
        rows = self.spec.rows_per_slot
        idle = np.flatnonzero(~self.live & (self.columns > 0))
        excess = np.maximum(self.columns - protected, 0)
        live = np.flatnonzero(self.live & (excess > 0))
        order = reclaim_slot_order(self.reclaim_policy, idle, live, excess, self.columns, self.freed_at)
        shrink = {}
        for slot in order:
            if shortfall_pages <= 0:
                break
            take = min(int(excess[slot]), -(-shortfall_pages // rows))
            shrink[slot] = int(self.columns[slot]) - take
            shortfall_pages -= take * rows
        return shrink

    def reclaim(self, keep: dict[int, int], table: PageTable) -> Reclaim:
        """The record of shrinking slots to ``keep`` columns (pages as the table maps them now)."""
        before = {s: SlotColumns(int(self.columns[s]), int(self.inherited[s]), int(self.shared[s]),
                                 int(self.cached[s])) for s in keep}
        virt = [self.spec.slot_virtual_pages(s, k, before[s].columns).reshape(-1) for s, k in keep.items()]
        virt = np.concatenate(virt) if virt else np.zeros(0, dtype=np.int64)
        return Reclaim(dict(keep), before, virt, table.phys[virt].astype(np.int64))

    def plan_growth(self, slots: np.ndarray, tokens: np.ndarray, table: PageTable,
                    free: np.ndarray | None = None) -> Growth:
        """The record of growing slots to cover ``tokens``, with pool pages chosen by place_pages (each
        row continues its physical run where it can, so mappings merge) among ``free`` ([num_pool_pages]
        bool; None: every unreferenced page)."""
        g_slots, g_from, g_to = self.growth(slots, tokens)
        spec = self.spec
        virt, lasts, counts = [], [], []
        for slot, first, end in zip(g_slots.tolist(), g_from.tolist(), g_to.tolist()):
            virt.append(spec.slot_virtual_pages(slot, first, end).reshape(-1))
            starts = spec.slot_row_starts(slot)
            lasts.append(table.phys[starts + first - 1].astype(np.int64) if first
                         else np.full(starts.shape, -1, dtype=np.int64))
            counts.append(np.full(starts.shape, end - first, dtype=np.int64))
        if not virt:
            empty = np.zeros(0, dtype=np.int64)
            return Growth(g_slots, g_from, g_to, empty, empty)
        free = table.refcount == 0 if free is None else free.copy()
        phys = place_pages(free, np.concatenate(lasts), np.concatenate(counts))
        return Growth(g_slots, g_from, g_to, np.concatenate(virt), phys)

    # ---- the column halves of applying and undoing records (cache.py does the page table halves) ----
    def grow(self, growth: Growth) -> None:
        self.columns[growth.slots] = growth.end

    def ungrow(self, growth: Growth) -> None:
        self.columns[growth.slots] = growth.first

    def shrink(self, keep: dict[int, int]) -> None:
        for s, k in keep.items():
            self.columns[s] = k
            self.inherited[s] = min(int(self.inherited[s]), k)
            self.shared[s] = min(int(self.shared[s]), k)
            self.cached[s] = min(int(self.cached[s]), k)

    def resync(self, table: PageTable) -> None:
        """Derive the columns from the page table (after it was re-read from the backend): mapped pages
        of each slot's rows; inherited, shared and cached columns clipped to them, and shared columns cover
        every page that several virtual pages map."""
        spec = self.spec
        shape = (spec.num_planes, spec.max_batch, spec.rows_per_plane, spec.pages_per_row)
        mapped = (table.phys != UNMAPPED).reshape(shape)
        self.columns[:] = mapped.sum(axis=3).max(axis=(0, 2))
        np.minimum(self.inherited, self.columns, out=self.inherited)
        np.minimum(self.shared, self.columns, out=self.shared)
        np.minimum(self.cached, self.columns, out=self.cached)
        multi = np.isin(table.phys, np.flatnonzero(table.refcount - table.held > 1)).reshape(shape).any(axis=(0, 2))
        last = np.where(multi.any(axis=1), spec.pages_per_row - np.argmax(multi[:, ::-1], axis=1), 0)
        np.maximum(self.shared, last, out=self.shared)

    def restore(self, before: dict[int, SlotColumns]) -> None:
        for s, cols in before.items():
            self.columns[s], self.inherited[s], self.shared[s], self.cached[s] = cols
