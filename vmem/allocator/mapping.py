"""The mapping core: one reservation, one pool, the page table between them, and the rules for changing it.

Shared by VirtualKVCache (cache.py) and the vLLM plugin's BlockMapper, which differ only in how they
name pages (slot columns vs vLLM block ids) and in who decides what grows.

Rationale: a native map or unmap and the page table's record of it must never disagree, and an unmap
must never pull a page from under a kernel still reading it. Both rules are easy to get almost right
in two places; here they are written once.

Approach: ``PageMapper.map`` / ``unmap`` / ``trim`` each make one all-or-nothing native call, then record
it in the PageTable. ``check()`` compares the table with the backend's own view (its virt -> phys table,
its mapping count, the OS's resident bytes). ``resync()`` rebuilds the table from the backend after an
exception that may have landed between a native call and its record (a KeyboardInterrupt).

CUDA-safe unmap: before every unmap the whole device is synchronised (``torch.cuda.synchronize``), not
just the current stream. The mapper cannot know which stream last read a page: vLLM and the engine may
launch on side streams or from other threads, and a CUDA graph replays on its own stream. Waiting for
the device is the rule that is right without that knowledge; deferred reclamation keeps unmaps rare
enough that its cost does not matter (native release does the same: cuda.c synchronises the context).

Limitations: the page table is the only record of references; references held by something other
than a mapping (a prefix index) must be re-added by its owner after ``resync()``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from vmem.allocator.page_table import UNMAPPED, PageTable
from vmem.errors import VmemInvalidArgument

RECLAIM_MODES = ("deferred", "eager")


def check_reclaim_mode(reclaim) -> str:
    """``reclaim`` if it is one of RECLAIM_MODES, else VmemInvalidArgument."""
    if reclaim not in RECLAIM_MODES:
        raise VmemInvalidArgument("reclaim must be one of %s, got %r" % (RECLAIM_MODES, reclaim))
    return reclaim


def synchronize_for_unmap(device: torch.device) -> None:
    """The one CUDA-safe unmap rule (module docstring): wait for every kernel on the device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PageMapper:
    """Virtual pages of ``reservation`` mapped to pages of ``pool``, recorded in ``self.table``.

    ``counters``: a dict this object adds to (map_calls, pages_mapped, map_seconds, unmap_calls,
    pages_unmapped, unmap_seconds, trimmed_pages); the owner reports it.

    Invariants (``check()``): the PageTable's own (reference counts, resident pages); the backend's
    table reads back as ``table.phys``; it holds the mappings the table implies; the OS backs exactly
    the resident pool pages (host memfd st_blocks).
    """

    def __init__(self, backend, reservation, pool, num_pool_pages: int, counters: dict):
        self.backend = backend
        self.reservation = reservation
        self.pool = pool
        self.device = backend.device
        self.table = PageTable(reservation.num_pages, num_pool_pages)
        self.counters = counters
        for key in ("map_calls", "pages_mapped", "unmap_calls", "pages_unmapped", "trimmed_pages"):
            counters.setdefault(key, 0)
        counters.setdefault("map_seconds", 0.0)
        counters.setdefault("unmap_seconds", 0.0)
        if pool.info()["backed_pages"] == num_pool_pages:
            # memory held from creation (cuda: every handle is created with the pool; host: a hugetlb memfd
            # is fallocated whole): resident until trimmed, as the backend reports it
            self.table.resident[:] = True

    # ---- native calls, each followed by its record ---------------------------------------------
    def map(self, virt: np.ndarray, phys: np.ndarray) -> None:
        """Map pool pages ``phys`` ([n] int64) at unmapped virtual pages ``virt`` ([n] int64); one call."""
        self.native_map(virt, phys)
        self.table.set(virt, phys)

    def unmap(self, virt: np.ndarray) -> np.ndarray:
        """Unmap ``virt`` ([n] int64) in one call, after the CUDA-safe wait. Returns the pool pages no
        virtual page maps any more ([m] int64, unique)."""
        self.native_unmap(virt)
        return self.table.clear(virt)

    def native_map(self, virt: np.ndarray, phys: np.ndarray) -> None:
        """The native half of map() alone (counted): for an owner that records the change itself."""
        t0 = time.perf_counter()
        self.reservation.map(virt, self.pool, phys)
        self.count_map(virt.size, time.perf_counter() - t0)

    def native_unmap(self, virt: np.ndarray) -> None:
        """The native half of unmap() alone (counted), after the CUDA-safe wait."""
        synchronize_for_unmap(self.device)
        t0 = time.perf_counter()
        self.reservation.unmap(virt)
        self.count_unmap(virt.size, time.perf_counter() - t0)

    def trim(self, phys: np.ndarray) -> None:
        """Host: punch unreferenced pool pages out of the memfd. CUDA keeps its pooled handles (creating
        one costs ~130 maps), so memory stays with the pool until close(), unless the pool is elastic
        (a budget lease): then trim releases the handles and gives the budget its pages back."""
        if phys.size and self.trims:
            self.pool.trim(phys)
            self.table.resident[phys] = False
            self.counters["trimmed_pages"] += int(phys.size)

    @property
    def trims(self) -> bool:
        """Whether trim() gives memory back (host; an elastic pool) or is a no-op (cuda's pooled handles)."""
        return self.backend.name == "host" or getattr(self.pool, "lease", None) is not None

    def trim_unreferenced(self) -> None:
        """Trim every resident page no virtual page maps."""
        self.trim(np.flatnonzero((self.table.refcount == 0) & self.table.resident))

    def count_map(self, num_pages: int, seconds: float = 0.0) -> None:
        c = self.counters
        c["map_calls"] += 1
        c["pages_mapped"] += int(num_pages)
        c["map_seconds"] += seconds

    def count_unmap(self, num_pages: int, seconds: float = 0.0) -> None:
        c = self.counters
        c["unmap_calls"] += 1
        c["pages_unmapped"] += int(num_pages)
        c["unmap_seconds"] += seconds

    # ---- agreement with the backend --------------------------------------------------------------
    def check(self) -> list[str]:
        """What is wrong, as sentences (empty: the invariants hold)."""
        problems = self.table.check()
        table = self.table
        theirs = self.reservation.mapping(0, table.phys.size)
        if not np.array_equal(theirs, table.phys.astype(np.int64)):
            bad = np.flatnonzero(theirs != table.phys)[:5]
            problems.append("the backend's table differs at virtual pages %s" % bad.tolist())
        runs = table.expected_mappings(coalesce_phys=self.backend.name == "host")
        if int(self.reservation.num_mappings) != runs:
            problems.append("the backend holds %d mappings, the page table implies %d"
                            % (self.reservation.num_mappings, runs))
        resident = self.pool.resident_bytes()
        if resident is not None and resident >= 0:
            ours = int(np.count_nonzero(table.resident)) * self.pool.page_bytes
            if resident != ours:
                problems.append("the OS backs %d bytes of the pool, the page table says %d" % (resident, ours))
        return problems

    def resync(self) -> None:
        """Make the page table the backend's again: after an exception between a native call and its
        record. Reads the backend's table (one call), recounts references, and, when the OS's resident
        bytes disagree, trims every unreferenced page so the resident flags are exact again."""
        theirs = self.reservation.mapping(0, self.table.phys.size)
        self.table.rebuild(theirs)
        resident = self.pool.resident_bytes()
        if resident is not None and resident >= 0 and self.trims:
            if resident != int(np.count_nonzero(self.table.resident)) * self.pool.page_bytes:
                unreferenced = np.flatnonzero(self.table.refcount == 0)
                if unreferenced.size:
                    self.pool.trim(unreferenced)
                self.table.resident[:] = self.table.refcount > 0

    def mapped(self, virt: np.ndarray) -> np.ndarray:
        """[n] bool: which of ``virt`` the page table says are mapped."""
        return self.table.phys[virt] != UNMAPPED
