"""CacheStats: one record every KV cache manager reports, so engines and benchmarks compare them."""

from __future__ import annotations

from typing import NamedTuple


class CacheStats(NamedTuple):
    """A snapshot of a cache's memory.

    A *page* is the manager's unit of physical memory: a pool page of ``page_bytes`` (vmem), a block of
    ``block_size`` tokens over all layers (paged) or a whole max-length request (static).
    ``total = used + reclaimable + free``; ``mapped = used + reclaimable`` (memory the OS/driver backs).
    ``used`` pages belong to live requests; ``reclaimable`` ones stay mapped in idle slots (deferred
    reclamation) and are taken back when the pool runs dry. ``internal_fragmentation`` is the share of
    used bytes that hold no live token: ``1 - live_token_bytes / used_bytes``.
    """

    kind: str
    page_bytes: int
    total_pages: int
    used_pages: int
    mapped_pages: int
    reclaimable_pages: int
    free_pages: int
    total_bytes: int
    used_bytes: int
    mapped_bytes: int
    reclaimable_bytes: int
    free_bytes: int
    live_slots: int
    live_tokens: int
    live_token_bytes: int
    internal_fragmentation: float
    map_calls: int
    unmap_calls: int
    pages_mapped: int
    pages_unmapped: int
    map_seconds: float
    unmap_seconds: float
    reclaimed_pages: int
    reused_pages: int
    os_mappings: int
    peak_used_pages: int
    peak_live_slots: int
    peak_live_tokens: int
    # elastic caches (a shared budget, allocator/elastic.py); 0 without one
    budget_limit_pages: int = 0            # the budget's limit, in this cache's pages
    budget_held_pages: int = 0             # pages this cache's lease holds (memory it has)
    budget_total_held_pages: int = 0       # pages every tenant of the budget holds
    budget_waiting_pages: int = 0          # this cache's refused demand (last 2 s)
    budget_others_waiting_pages: int = 0   # the other tenants' demand
    budget_peak_pages: int = 0

    @classmethod
    def build(cls, *, kind: str, page_bytes: int, total_pages: int, used_pages: int, reclaimable_pages: int,
              live_slots: int, live_tokens: int, token_bytes: int, counters: dict, os_mappings: int = 0,
              peaks: dict) -> "CacheStats":
        mapped = used_pages + reclaimable_pages
        free = total_pages - mapped
        used_bytes = used_pages * page_bytes
        live_token_bytes = live_tokens * token_bytes
        frag = 1.0 - live_token_bytes / used_bytes if used_bytes else 0.0
        return cls(
            kind=kind, page_bytes=page_bytes, total_pages=total_pages, used_pages=used_pages,
            mapped_pages=mapped, reclaimable_pages=reclaimable_pages, free_pages=free,
            total_bytes=total_pages * page_bytes, used_bytes=used_bytes, mapped_bytes=mapped * page_bytes,
            reclaimable_bytes=reclaimable_pages * page_bytes, free_bytes=free * page_bytes,
            live_slots=live_slots, live_tokens=live_tokens, live_token_bytes=live_token_bytes,
            internal_fragmentation=max(0.0, frag),
            map_calls=counters["map_calls"], unmap_calls=counters["unmap_calls"],
            pages_mapped=counters["pages_mapped"], pages_unmapped=counters["pages_unmapped"],
            map_seconds=counters["map_seconds"], unmap_seconds=counters["unmap_seconds"],
            reclaimed_pages=counters["reclaimed_pages"], reused_pages=counters["reused_pages"],
            os_mappings=os_mappings, peak_used_pages=peaks["used_pages"], peak_live_slots=peaks["live_slots"],
            peak_live_tokens=peaks["live_tokens"])


def new_counters() -> dict:
    return {"map_calls": 0, "unmap_calls": 0, "pages_mapped": 0, "pages_unmapped": 0, "map_seconds": 0.0,
            "unmap_seconds": 0.0, "reclaimed_pages": 0, "reused_pages": 0}


def new_peaks() -> dict:
    return {"used_pages": 0, "live_slots": 0, "live_tokens": 0}
