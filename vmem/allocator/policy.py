"""Policies of the virtual cache, kept apart from the mechanism (page_table.py, cache.py).

Two decisions, each behind one small object:
  * which idle slot gives its pages back first when the pool runs dry (ReclaimPolicy);
  * which free slot a new request gets (SlotPolicy): one whose pages are still mapped saves map calls.
"""

from __future__ import annotations

import numpy as np

from vmem.errors import VmemInvalidArgument


class ReclaimPolicy:
    """Least recently freed first: the slot idle the longest is the least likely to be reused soon.

    ``order(idle, mapped_columns, freed_at)``: idle [n] int64 slot ids that hold pages; mapped_columns and
    freed_at are [max_batch] int64 (columns each slot has mapped; a counter value at its last free).
    Returns the slots in the order their pages are taken back (tail columns first within a slot).
    """

    name = "lru"

    def order(self, idle: np.ndarray, mapped_columns: np.ndarray, freed_at: np.ndarray) -> list[int]:
        return [int(s) for s in idle[np.argsort(freed_at[idle], kind="stable")]]


class FewestPagesFirst(ReclaimPolicy):
    """Empty small idle slots first, keeping the big mapped slots for long requests."""

    name = "fewest"

    def order(self, idle, mapped_columns, freed_at):
        keys = np.lexsort((freed_at[idle], mapped_columns[idle]))
        return [int(s) for s in idle[keys]]


RECLAIM_POLICIES = {"lru": ReclaimPolicy, "fewest": FewestPagesFirst}


def get_reclaim_policy(policy) -> ReclaimPolicy:
    """A ReclaimPolicy from its name ("lru" | "fewest") or itself."""
    if isinstance(policy, ReclaimPolicy):
        return policy
    if not isinstance(policy, str) or policy not in RECLAIM_POLICIES:
        raise VmemInvalidArgument("reclaim_policy must be one of %s, got %r" % (sorted(RECLAIM_POLICIES), policy))
    return RECLAIM_POLICIES[policy]()


def reclaim_slot_order(policy: ReclaimPolicy, idle: np.ndarray, live: np.ndarray, excess: np.ndarray,
                       mapped_columns: np.ndarray, freed_at: np.ndarray) -> list[int]:
    """The order in which slots give pages back; within a slot the deepest pages go first (tail first).

    idle: [n] int64 slots without a live request that hold pages, taken first, in ``policy`` order;
    live: [m] int64 slots whose request leaves mapped pages unused, then, largest unused tail first
    (excess: [max_batch] int64, pages or columns beyond what each slot must keep). mapped_columns and
    freed_at as in ReclaimPolicy.order. Used by VirtualKVCache (columns) and the vLLM plugin (blocks).
    """
    order = policy.order(idle, mapped_columns, freed_at)
    return order + [int(s) for s in live[np.argsort(-excess[live], kind="stable")]]


class SlotPolicy:
    """Pick the free slot for a new request.

    With a length hint: the best fit, i.e. the slot with the fewest mapped columns that still covers
    the hint (no map call at all), else the one with the most (fewest to map). Without a hint: the
    slot with the most mapped columns. Ties go to the lowest slot id, so the order is reproducible.
    """

    def choose(self, free_slots: np.ndarray, mapped_columns: np.ndarray, needed_columns: int | None) -> int:
        cols = mapped_columns[free_slots]
        if needed_columns is not None:
            fits = cols >= needed_columns
            if fits.any():
                candidates = free_slots[fits]
                return int(candidates[np.argmin(mapped_columns[candidates])])
        return int(free_slots[np.argmax(cols)])
