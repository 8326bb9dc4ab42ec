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
from dataclasses import dataclass

import numpy as np

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
