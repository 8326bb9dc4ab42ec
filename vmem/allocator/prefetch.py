"""Async prefetch of VirtualKVCache: the jobs on the native worker and the record of the one in flight.

A prefetch is at most two jobs on the worker's FIFO queue: an unmap of the pages it takes back from idle
slots (when free pages do not cover it), then the map of the growth. The worker copies the page arrays
and touches no Python object; this side keeps the tickets and the records (planning.Growth, Reclaim)
that say what to undo if a job failed. Which undo to do is the cache's decision (cache.py ``_settle``):
this module only waits and reports.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from vmem.allocator.mapping import PageMapper
from vmem.allocator.planning import Growth, Reclaim
from vmem.errors import VmemError


class Prefetch(NamedTuple):
    """A prefetch in flight: the map job and its growth; the unmap job queued before it and the reclaim
    it carries out (both None when free pages covered the growth)."""
    ticket: int
    growth: Growth
    unmap_ticket: int | None
    reclaim: Reclaim | None


class Settled(NamedTuple):
    """How a prefetch ended: the error of each job, None where it ran."""
    prefetch: Prefetch
    map_error: VmemError | None
    unmap_error: VmemError | None

    @property
    def ok(self) -> bool:
        return self.map_error is None and self.unmap_error is None


class Prefetcher:
    """The async mapper of one cache and its prefetch in flight (at most one: every other call settles it)."""

    def __init__(self, async_mapper, pages: PageMapper):
        self.mapper = async_mapper
        self.pages = pages
        self.pending: Prefetch | None = None

    def submit_unmap(self, reclaim: Reclaim) -> int:
        return self.mapper.submit_unmap(self.pages.reservation, reclaim.virt)

    def submit_map(self, growth: Growth) -> int:
        return self.mapper.submit(self.pages.reservation, growth.virt, self.pages.pool, growth.phys)

    def wait_unmap(self, ticket: int, reclaim: Reclaim) -> VmemError | None:
        """Wait for an unmap job; count it if it ran, else return its error (it was rolled back)."""
        try:
            self.mapper.wait(ticket)
        except VmemError as exc:
            return exc
        self.pages.count_unmap(reclaim.num_pages)
        return None

    def settle(self) -> Settled | None:
        """Wait for the prefetch in flight (only blocks if the worker is behind); None if there is none.
        Adds the wait to counters["async_wait_seconds"]; counts the jobs that ran."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        t0 = time.perf_counter()
        unmap_error = map_error = None
        try:
            if pending.reclaim is not None:
                unmap_error = self.wait_unmap(pending.unmap_ticket, pending.reclaim)
            try:
                self.mapper.wait(pending.ticket)
            except VmemError as exc:
                map_error = exc
        finally:
            self.pages.counters["async_wait_seconds"] += time.perf_counter() - t0
        if map_error is None and unmap_error is None:
            self.pages.count_map(pending.growth.num_pages)
        return Settled(pending, map_error, unmap_error)

    def close(self) -> None:
        self.mapper.close()
