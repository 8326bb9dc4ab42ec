"""Elastic KV memory for VirtualKVCache: its pool draws pages from a shared Budget and gives idle ones back.

Mechanism (vmem/_native/budget.c, Note [Shared KV budget]): the cache's pool is elastic, so the native
map charges the tenant's lease for every page that gains memory and a trim gives the charge back; a
step that the budget cannot cover raises VmemOutOfMemory and changes nothing, like any other.

Policy (this file): when pages go back. A tenant holds pages it could give back: idle slots' pages
and live slots' columns beyond their length (deferred reclamation keeps them mapped for reuse). It
gives them back (unmap + trim, tail columns first, slots in ReclaimPolicy order):

  * when another tenant waits (``yield_to_waiters``): as many pages as the others' recorded demand;
  * after an idle period (``idle_release_s``): every reclaimable page once the cache has had no live
    slot for that long.

``VirtualKVCache.maintain()`` applies the policy; the engine calls it after every step and its server
loop while idle (at least every 0.1 s), so memory flows back within ``idle_release_s`` + 0.1 s.
Free pages that still hold memory (left by a reclaim whose pages placement did not use) are trimmed
there too, so at rest a tenant holds exactly its mapped pages.

Placement: a page that already holds memory costs the budget nothing, so growth takes those first
(``free_mask``), then the fewest, longest runs of pages without memory.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from vmem.allocator.base import synchronized, transaction
from vmem.errors import VmemInvalidArgument


@dataclass(frozen=True)
class BudgetPolicy:
    """Knobs of an elastic cache (module docstring).

    idle_release_s: give every reclaimable page back once no slot has been live this long (None: never).
    yield_to_waiters: give reclaimable pages back when another tenant's demand is recorded.
    min_bytes / max_bytes: the lease's guaranteed minimum (must be free at creation) and cap (None: none).
    maintain_interval_s: maintain() does its budget queries at most this often (a step calls it each time).
    """
    idle_release_s: float | None = 0.5
    yield_to_waiters: bool = True
    min_bytes: int = 0
    max_bytes: int | None = None
    maintain_interval_s: float = 0.02

    def __post_init__(self):
        if self.idle_release_s is not None and not 0 <= self.idle_release_s < 1e9:
            raise VmemInvalidArgument("idle_release_s must be >= 0 or None, got %r" % (self.idle_release_s,))
        if not 0 <= self.maintain_interval_s < 1e9:
            raise VmemInvalidArgument("maintain_interval_s must be >= 0, got %r" % (self.maintain_interval_s,))


def open_lease(budget, policy: BudgetPolicy, name: str):
    """(lease, owned) for ``budget``: a Lease as given (not owned), or a new lease on a Budget or on the
    budget named / at the path ``budget`` (owned: the cache closes it)."""
    from vmem.backends.budget import Budget, Lease

    if isinstance(budget, Lease):
        return budget, False
    if isinstance(budget, str):
        budget = Budget(budget)
    if not isinstance(budget, Budget):
        raise VmemInvalidArgument("budget must be a Budget, a Lease or a budget name/path, got %r" % (budget,))
    return budget.lease(name, min_bytes=policy.min_bytes, max_bytes=policy.max_bytes), True


def free_mask(refcount: np.ndarray, resident: np.ndarray, needed: int) -> np.ndarray:
    """[num_pool_pages] bool: the free pages growth may take, ``needed`` of them when there are enough.

    Free pages holding memory first (no charge); the rest from pages without memory, longest free runs
    first, so the budget is charged exactly ``needed - (free pages holding memory)`` pages.
    """
    free = refcount == 0
    mask = free & resident
    extra = needed - int(np.count_nonzero(mask))
    if extra <= 0:
        return mask
    empty = free & ~resident
    padded = np.concatenate(([False], empty, [False])).astype(np.int8)
    edges = np.diff(padded)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    for i in np.argsort(starts - ends, kind="stable"):     # longest first
        take = min(int(ends[i] - starts[i]), extra)
        mask[starts[i]:starts[i] + take] = True
        extra -= take
        if extra == 0:
            break
    return mask


class IdleClock:
    """When the cache last had no live slot (None while some slot is live)."""

    def __init__(self):
        self.idle_since: float | None = time.monotonic()

    def update(self, num_live: int) -> None:
        if num_live:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = time.monotonic()

    def idle_for(self) -> float:
        return 0.0 if self.idle_since is None else time.monotonic() - self.idle_since


class ElasticPages:
    """VirtualKVCache's side of the budget (mixed into it): applying the BudgetPolicy, giving pages back,
    telling the scheduler whether to wait. Reads and writes the cache's state under its lock."""

    @property
    def lease(self):
        """The budget Lease pages are charged to, or None."""
        return self._lease


    @transaction
    def maintain(self, *, force: bool = False) -> int:
        """Apply the BudgetPolicy (elastic.py): publish what could be given back, give reclaimable pages
        back to waiting tenants and after the idle period, trim free pages still holding memory.
        Returns the pages released. No-op without a budget; the queries run at most every
        ``maintain_interval_s`` unless ``force``. May unmap (not inside a CUDA graph)."""
        if self._lease is None or self._closed:
            return 0
        now = time.monotonic()
        if not force and now - self._last_maintain < self.budget_policy.maintain_interval_s:
            return 0
        self._last_maintain = now
        self._settle()
        policy, page_bytes = self.budget_policy, self.spec.page_bytes
        released = 0
        if policy.idle_release_s is not None and not self._live.any() and self._idle.idle_for() >= policy.idle_release_s:
            released += self.reclaim_idle()
        elif policy.yield_to_waiters:
            waiting = self._lease.info().others_waiting_bytes
            if waiting > 0:
                released += self._release_pages(-(-waiting // page_bytes))
        self._pages.trim_unreferenced()
        self._lease.set_reclaimable(self._reclaimable() * page_bytes)   # prefix-index columns too
        return released


    def _release_pages(self, num_pages: int) -> int:
        """Unmap and trim about ``num_pages`` reclaimable pages: slots' columns first (whole columns,
        policy order), then unlocked prefix-index columns (least recently used leaf first)."""
        free = self._table.num_free
        protected = self._cols.protected()
        protected[~self._live] = 0             # idle slots' cached columns too: the index keeps its reference
        if self._cols.reclaimable_pages(protected):
            reclaim = self._shrink(self._cols.plan_reclaim(num_pages, protected), trim=True)
            self._counters["reclaimed_pages"] += reclaim.num_pages
        short = num_pages - (self._table.num_free - free)
        if short > 0 and self._index.num_evictable:
            self._pages.trim(self._evict(self._index.plan_eviction(-(-short // self.spec.rows_per_slot))))
        return self._table.num_free - free


    @synchronized
    def budget_short(self, needs: Mapping[int, int]) -> bool:
        """True when step(needs) fails only because the shared budget is short (the pool could hold it):
        the caller should wait, not preempt or fail. Records the shortfall as this tenant's demand, so
        the others give reclaimable pages back (their maintain())."""
        if self._lease is None:
            return False
        slots, tokens = self._parse_needs(needs)
        needed = self._fresh_pages(slots, tokens)
        reclaimable = self._reclaimable(self._cols.protected(slots, tokens))
        available = self._free_pages() + reclaimable
        if needed <= available or needed > self._table.num_free + reclaimable:
            return False                   # it fits, or the pool itself is too small
        self._lease.set_demand((needed - available) * self.spec.page_bytes)
        return True


    def budget_reclaimable_elsewhere(self) -> int:
        """Bytes the budget's other tenants say they could give back (0 without a budget)."""
        return 0 if self._lease is None else self._lease.info().others_reclaimable_bytes
