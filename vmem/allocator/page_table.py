"""The page table (virtual page -> physical page, with reference counts) and physical placement.

Mechanism only: this module knows which pages are mapped where; it knows nothing of requests,
schedulers or reclamation order (see policy.py).

Placement. ``vm.max_map_count`` (65,530 on the project machines) caps how many OS mappings a
process may hold, and adjacent virtual pages backed by *consecutive* pool pages merge into one
mapping. So a row's new pages continue the physical run of its previous page when those pool
pages are free, and a row that must start a new run starts it in the middle of the largest free
run, leaving room for both its left neighbour and itself to keep growing contiguously.
"""

from __future__ import annotations

import heapq

import numpy as np

from vmem.errors import VmemInvalidArgument

UNMAPPED = -1


class PageTable:
    """Virtual pages of one reservation -> physical pages of one pool.

    ``phys[v]`` is the pool page mapped at virtual page ``v`` or -1; ``refcount[p]`` counts the
    virtual pages that map pool page ``p`` (more than one once prefixes are shared) plus ``held[p]``,
    references held without a mapping (the prefix index's, see prefix.py).

    Invariants (``check()`` verifies them):
      * ``refcount[p] == #{v : phys[v] == p} + held[p]`` for every pool page p;
      * ``num_used == #{p : refcount[p] > 0}`` and ``num_mapped_virtual == #{v : phys[v] >= 0}``;
      * a resident page is one the OS holds memory for: every referenced page is resident.
    """

    def __init__(self, num_virtual_pages: int, num_pool_pages: int):
        self.phys = np.full(num_virtual_pages, UNMAPPED, dtype=np.int32 if num_pool_pages < 2**31 else np.int64)
        self.refcount = np.zeros(num_pool_pages, dtype=np.int32)
        self.resident = np.zeros(num_pool_pages, dtype=bool)
        self.held = np.zeros(num_pool_pages, dtype=np.int32)
        self.num_used = 0
        self.num_mapped_virtual = 0

    @property
    def num_pool_pages(self) -> int:
        return int(self.refcount.shape[0])

    @property
    def num_free(self) -> int:
        return self.num_pool_pages - self.num_used

    def set(self, virt: np.ndarray, phys: np.ndarray) -> None:
        """Record that ``virt[i]`` now maps ``phys[i]`` (the virtual pages were unmapped)."""
        if np.any(self.phys[virt] != UNMAPPED):
            raise VmemInvalidArgument("page table: virtual page already mapped")
        self.phys[virt] = phys
        before = self.refcount[phys] == 0
        np.add.at(self.refcount, phys, 1)
        self.num_used += int(np.unique(phys[before]).size)
        self.num_mapped_virtual += int(virt.size)
        self.resident[phys] = True

    def clear(self, virt: np.ndarray) -> np.ndarray:
        """Forget the mappings of ``virt``; return the pool pages whose count dropped to zero."""
        phys = self.phys[virt].astype(np.int64)
        if np.any(phys == UNMAPPED):
            raise VmemInvalidArgument("page table: virtual page not mapped")
        self.phys[virt] = UNMAPPED
        np.subtract.at(self.refcount, phys, 1)
        released = np.unique(phys[self.refcount[phys] == 0])
        self.num_used -= int(released.size)
        self.num_mapped_virtual -= int(virt.size)
        return released

    def hold(self, phys: np.ndarray) -> None:
        """Take a reference to pool pages ``phys`` ([n] int64, resident: they hold data) that outlives
        their mappings."""
        if np.any(~self.resident[phys]):
            raise VmemInvalidArgument("page table: only resident pages can be held")
        before = self.refcount[phys] == 0
        np.add.at(self.held, phys, 1)
        np.add.at(self.refcount, phys, 1)
        self.num_used += int(np.unique(phys[before]).size)

    def release(self, phys: np.ndarray) -> np.ndarray:
        """Drop references taken by hold(); return the pool pages whose count dropped to zero."""
        if np.any(self.held[phys] <= 0):
            raise VmemInvalidArgument("page table: releasing a page that is not held")
        np.subtract.at(self.held, phys, 1)
        np.subtract.at(self.refcount, phys, 1)
        released = np.unique(phys[self.refcount[phys] == 0])
        self.num_used -= int(released.size)
        return released

    def rebuild(self, phys: np.ndarray) -> None:
        """Take ``phys`` ([num_virtual_pages] int64, -1 unmapped: the backend's own table) as the truth and
        recount everything from it; referenced pages become resident (the others keep their flag)."""
        phys = np.asarray(phys, dtype=np.int64)
        mapped = phys[phys != UNMAPPED]
        self.phys[:] = phys
        self.refcount[:] = np.bincount(mapped, minlength=self.num_pool_pages)[:self.num_pool_pages] + self.held
        self.num_used = int(np.count_nonzero(self.refcount))
        self.num_mapped_virtual = int(mapped.size)
        self.resident |= self.refcount > 0

    def lookup(self, virt: np.ndarray) -> np.ndarray:
        return self.phys[virt]

    def expected_mappings(self, coalesce_phys: bool = True) -> int:
        """Mappings the backend should report for this table.

        coalesce_phys (host): OS mappings (VMAs) of the whole range, i.e. segments separated where the
        mapped state changes or where consecutive mapped pages are not consecutive in the pool (the
        kernel merges the rest); unmapped gaps count as the reservation's own segments.
        Otherwise (cuda): maximal runs of mapped virtual pages.
        """
        phys = self.phys.astype(np.int64)
        if phys.size == 0:
            return 0
        mapped = phys != UNMAPPED
        if not coalesce_phys:
            return int(np.count_nonzero(mapped[0:1])) + int(np.count_nonzero(mapped[1:] & ~mapped[:-1]))
        both_free = ~mapped[1:] & ~mapped[:-1]
        joined = mapped[1:] & mapped[:-1] & (phys[1:] == phys[:-1] + 1)
        return 1 + int(np.count_nonzero(~(both_free | joined)))

    def check(self) -> list[str]:
        problems = []
        mapped = self.phys[self.phys != UNMAPPED].astype(np.int64)
        counts = np.bincount(mapped, minlength=self.num_pool_pages) if mapped.size else np.zeros_like(self.refcount)
        if counts.shape[0] != self.num_pool_pages:
            problems.append("page table maps pool pages beyond the pool (%d >= %d)"
                            % (counts.shape[0] - 1, self.num_pool_pages))
        elif not np.array_equal(counts + self.held, self.refcount):
            bad = np.flatnonzero(counts != self.refcount)[:5]
            problems.append("reference counts disagree with the page table at pool pages %s" % bad.tolist())
        if np.any(self.refcount < 0) or np.any(self.held < 0):
            problems.append("negative reference counts")
        if self.num_used != int(np.count_nonzero(self.refcount)):
            problems.append("num_used %d != pages with references %d"
                            % (self.num_used, np.count_nonzero(self.refcount)))
        if self.num_mapped_virtual != int(mapped.size):
            problems.append("num_mapped_virtual %d != mapped virtual pages %d" % (self.num_mapped_virtual, mapped.size))
        if np.any((self.refcount > 0) & ~self.resident):
            problems.append("a referenced pool page is not marked resident")
        return problems


def place_pages(free: np.ndarray, lasts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Choose pool pages for rows that grow; mark them taken in ``free``.

    free: [num_pool_pages] bool, True where a pool page may be taken (updated in place).
    lasts: [num_rows] int64, pool page of each row's last mapped page, or -1 for an empty row.
    counts: [num_rows] int64, pages each row needs.
    Returns the chosen pages, [counts.sum()] int64, row after row (row i's pages in order).

    ::

        row i:  ... | last |  last+1 ... last+m  |  fresh run(s) for the remaining counts[i]-m
                     mapped   continue in place     in the middle of the largest free run

    The caller checked ``counts.sum() <= free.sum()``.
    """
    lasts = np.asarray(lasts, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    num_rows = lasts.shape[0]
    if num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    capacity = free.shape[0]
    width = int(counts.max())
    steps = np.arange(width, dtype=np.int64)[None, :]
    wanted = lasts[:, None] + 1 + steps
    # Rows extend in place only from distinct last pages: rows ending on one shared page (a shared
    # prefix) would otherwise both take its neighbour. Distinct lasts give disjoint extensions (a row's
    # own last page is mapped, so a lower row's extension stops before it).
    extendable = lasts >= 0
    if num_rows > 1:
        order = np.argsort(lasts, kind="stable")      # rows arrive nearly sorted: cheap
        ordered = lasts[order]
        repeat = (ordered[1:] == ordered[:-1]) & (ordered[1:] >= 0)
        if repeat.any():
            extendable[order[1:][repeat]] = False
    ok = extendable[:, None] & (steps < counts[:, None]) & (wanted < capacity)
    ok &= free[np.minimum(wanted, capacity - 1)]
    extended = np.cumprod(ok, axis=1, dtype=np.int8).sum(axis=1, dtype=np.int64)
    taken_mask = steps < extended[:, None]
    free[wanted[taken_mask]] = False
    remaining = counts - extended
    if not remaining.any():
        return wanted[taken_mask]

    runs = _free_runs(free)
    pieces: list[np.ndarray] = []
    for row in range(num_rows):
        if extended[row]:
            pieces.append(wanted[row, :extended[row]])
        need = int(remaining[row])
        while need:
            neg_length, start = heapq.heappop(runs)
            length = -neg_length
            take = min(need, length)
            first = start + (length - take) // 2 if start > 0 else start
            pieces.append(np.arange(first, first + take, dtype=np.int64))
            if first > start:
                heapq.heappush(runs, (-(first - start), start))
            if first + take < start + length:
                heapq.heappush(runs, (-(start + length - first - take), first + take))
            need -= take
    chosen = np.concatenate(pieces)
    free[chosen] = False
    return chosen


def _free_runs(free: np.ndarray) -> list[tuple[int, int]]:
    """Heap of (-length, start) for maximal runs of True in ``free``."""
    padded = np.concatenate(([False], free, [False])).astype(np.int8)
    edges = np.diff(padded)
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    runs = list(zip((starts - ends).tolist(), starts.tolist()))
    heapq.heapify(runs)
    return runs
