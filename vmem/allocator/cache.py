"""VirtualKVCache: contiguous virtual K/V tensors with physical pages mapped on demand.

Rationale: attention kernels written for dense caches (flash_attn_with_kvcache with cache_batch_idx,
SDPA) run unchanged on ``[max_batch, max_seq, Hkv, D]`` tensors, while memory is only spent on pages
that hold tokens, as with PagedAttention.

Approach: ONE reservation holds every plane (each layer's or layer group's K and V, spec.py), so making
room for a step is one native map call for the whole batch; ONE pool of physical pages bounded by
``memory_bytes``. A slot grows by *columns* (page j of every row of the slot). Physical placement keeps
each row on consecutive pool pages where it can (page_table.place_pages) so mappings merge and the
process stays far below vm.max_map_count.

Reclamation: ``deferred`` (default) leaves a finished request's pages mapped in its slot; the next request
there reuses them without a map call, and idle slots give pages back (tail columns first, slots in
ReclaimPolicy order) only when the pool runs dry, followed by live slots' columns beyond their length
(pages a short request inherited from a longer one). ``eager`` unmaps at free_slot and returns the memory to
the OS (host: trim punches the memfd hole). On CUDA every unmap first synchronises the device, so no
kernel still reads the pages; deferred reclamation keeps that rare.

Async: ``prefetch(needs)`` plans the next step from free pages only and hands the batch to the native
worker thread (it copies the arrays; it never touches Python objects). The page table records the plan
at once; every other call first settles the ticket (waits only if the worker is behind); a failed
prefetch was rolled back natively, and settling undoes its plan here, so it corrupts nothing and the next
step maps synchronously.

Limitations: pages shared between slots (reference counts > 1) are never counted as reclaimable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
import torch

from vmem.allocator.base import SlotCache
from vmem.allocator.page_table import UNMAPPED, PageTable, place_pages
from vmem.allocator.policy import RECLAIM_POLICIES, ReclaimPolicy, SlotPolicy
from vmem.allocator.spec import KVCacheSpec
from vmem.allocator.stats import CacheStats
from vmem.errors import VmemError, VmemIntegrityError, VmemInvalidArgument, VmemOutOfMemory, VmemSlotError

logger = logging.getLogger(__name__)

RECLAIM_MODES = ("deferred", "eager")


class VirtualKVCache(SlotCache):
    """KV cache over virtual memory (host memfd/mmap or CUDA VMM), see the module docstring.

    Invariants (``check_integrity()`` verifies them; tests call it after every operation):
      1. the page table is consistent: reference counts equal the virtual pages mapping each pool page,
         and a pool page is free iff its count is 0 (PageTable.check);
      2. every row of slot s has exactly columns[s] mapped pages, and they are its first ones;
      3. a live slot's columns cover its length: columns[s] >= row_pages_for_tokens(length[s]);
         a free slot has length 0, and in eager mode no pages;
      4. used + reclaimable + free == pool pages (used: the columns covering live slots' lengths;
         reclaimable: idle slots' pages and live slots' columns beyond their lengths);
      5. a pool page referenced more than once (a shared prefix) lies in the first shared[s] columns of
         the slots that map it, which are protected from reclamation and from shrinking;
      6. the backend agrees: its own table reads back as ours, it holds as many mappings as our runs
         imply, and the OS backs exactly the resident pool pages (host: memfd st_blocks).
    """

    kind = "vmem"

    def __init__(self, spec: KVCacheSpec, *, memory_bytes: int | None = None, backend="auto", device=None,
                 reclaim: str = "deferred", async_map: bool = False, reclaim_policy: str | ReclaimPolicy = "lru"):
        super().__init__(spec, spec.max_batch, None)
        if reclaim not in RECLAIM_MODES:
            raise VmemInvalidArgument("reclaim must be one of %s, got %r" % (RECLAIM_MODES, reclaim))
        self.reclaim = reclaim
        if isinstance(reclaim_policy, str):
            if reclaim_policy not in RECLAIM_POLICIES:
                raise VmemInvalidArgument("reclaim_policy must be one of %s" % sorted(RECLAIM_POLICIES))
            reclaim_policy = RECLAIM_POLICIES[reclaim_policy]()
        self.reclaim_policy = reclaim_policy
        self.slot_policy = SlotPolicy()
        if memory_bytes is None:
            pool_pages = spec.num_virtual_pages
        else:
            if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= 0:
                raise VmemInvalidArgument("memory_bytes must be a positive int, got %r" % (memory_bytes,))
            pool_pages = min(memory_bytes // spec.page_bytes, spec.num_virtual_pages)
        if pool_pages < spec.rows_per_slot:
            raise VmemInvalidArgument(
                "memory_bytes=%s holds %d pages of %d bytes; one column of a slot needs %d"
                % (memory_bytes, pool_pages, spec.page_bytes, spec.rows_per_slot))
        self._backend = _open_backend(backend, device)
        self.device = self._backend.device
        granularity = int(self._backend.granularity_bytes)
        if spec.page_bytes % granularity:
            raise VmemInvalidArgument("page_bytes=%d is not a multiple of the %s backend's granularity %d"
                                      % (spec.page_bytes, self._backend.name, granularity))
        if spec.padded_max_seq_len != spec.max_seq_len:
            logger.info("max_seq_len %d padded to %d tokens so every row starts on a page boundary",
                        spec.max_seq_len, spec.padded_max_seq_len)
        self._reservation = self._backend.reserve(spec.reservation_bytes, spec.page_bytes)
        self._pool = None
        try:
            self._pool = self._backend.create_pool(spec.page_bytes, pool_pages, max_pages=pool_pages)
            self._init_state(pool_pages, async_map)
        except BaseException:
            self._planes = []
            if self._pool is not None:
                self._pool.close()
            self._reservation.close()
            raise

    def _init_state(self, pool_pages: int, async_map: bool) -> None:
        spec = self.spec
        self._planes = [self._reservation.tensor(spec.dtype, spec.plane_shape, offset_bytes=spec.plane_offset_bytes(p))
                        for p in range(spec.num_planes)]
        self._table = PageTable(spec.num_virtual_pages, pool_pages)
        if self._pool.info()["backed_pages"] == pool_pages:
            # memory held from creation (cuda: every handle is created with the pool; host: a hugetlb memfd
            # is fallocated whole): resident until trimmed, as the backend reports it
            self._table.resident[:] = True
        self._columns = np.zeros(spec.max_batch, dtype=np.int64)
        self._inherited = np.zeros(spec.max_batch, dtype=np.int64)   # columns a request found in its slot
        self._shared = np.zeros(spec.max_batch, dtype=np.int64)      # leading columns shared with another slot
        self._reclaimed = None    # ({slot: (columns, inherited)} before, virt, phys) taken during the current step
        self._freed_at = np.zeros(spec.max_batch, dtype=np.int64)
        self._clock = 0
        self._mapper = self._backend.async_mapper() if async_map else None
        self._pending = None      # (ticket, virt, phys, slots, columns before) of a prefetch in flight
        self._eager_leftovers = set()   # eager mode: free slots whose unmap failed (pages kept, reclaimable)
        self._counters.update(prefetch_pages=0, prefetch_failures=0, async_wait_seconds=0.0, trimmed_pages=0)

    # ---- views ----------------------------------------------------------------------------
    @property
    def num_pool_pages(self) -> int:
        return self._table.num_pool_pages

    @property
    def reservation(self):
        return self._reservation

    @property
    def pool(self):
        return self._pool

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-copy K, V of a layer: NHD/GROUPED [max_batch, max_seq_len, Hkv, D] (GROUPED strided),
        HND [max_batch, Hkv, max_seq_len, D]; spec.dtype. Pure: no map, safe in a CUDA graph."""
        self._check_open()
        return self.spec.layer_views(self._planes, layer)

    def attention(self, layer, q, k, v, cache_seqlens, slots, causal=True, softmax_scale=None):
        """q: [B, S, Hq, D]; k, v: [B, S, Hkv, D] (appended at cache_seqlens); cache_seqlens, slots: [B] int32.

        Returns out [B, S, Hq, D]. step() must have made room for cache_seqlens + S tokens.
        """
        from vmem.attention import flash_attn_with_kvcache
        self._check_attention_args(q, cache_seqlens, slots)
        k_cache, v_cache = self.kv(layer)
        return flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                       cache_batch_idx=slots, softmax_scale=softmax_scale, causal=causal,
                                       kv_layout=self.spec.kv_layout)

    # ---- slots ----------------------------------------------------------------------------
    @property
    def num_free_slots(self) -> int:
        """Free slots a request can get (a freed slot still holding shared pages waits for their unmap)."""
        return int(np.count_nonzero(~self._live & (self._shared == 0)))

    def alloc_slot(self, num_tokens: int | None = None) -> int:
        if self._shared.any() and not self.num_free_slots:
            self.reclaim_idle()               # retry unmapping shared pages left in freed slots
        slot = super().alloc_slot(num_tokens)
        self._inherited[slot] = self._columns[slot]
        return slot

    def _choose_slot(self, free: np.ndarray, num_tokens: int | None) -> int:
        free = free[self._shared[free] == 0]
        if not free.size:
            raise VmemSlotError("every free slot still holds shared pages whose unmap failed")
        needed = None if num_tokens is None else self.spec.row_pages_for_tokens(num_tokens)
        return self.slot_policy.choose(free, self._columns, needed)

    def _release_slot(self, slot: int) -> None:
        self._settle()
        self._clock += 1
        self._freed_at[slot] = self._clock
        self._eager_leftovers.discard(slot)
        if self._shared[slot]:
            # The next request in this slot would write over pages another request reads: unmap now.
            try:
                self._shrink({slot: 0}, trim=True)
            except VmemError as exc:   # the slot waits (num_free_slots skips it) until an unmap succeeds
                logger.warning("unmap of shared pages of slot %d failed (%s); retried later", slot, exc)
            return
        if self.reclaim == "eager" and self._columns[slot]:
            try:
                self._shrink({slot: 0}, trim=True)
            except VmemError as exc:   # e.g. the mapping budget: keep the pages as deferred, lose nothing
                self._eager_leftovers.add(slot)
                logger.warning("eager unmap of slot %d failed (%s); its pages stay mapped until reclaimed", slot, exc)

    # ---- planning (pure) ------------------------------------------------------------------
    def _growth(self, slots: np.ndarray, tokens: np.ndarray):
        """(slots that grow, their columns now, columns wanted) for needs."""
        target = self.spec.row_pages_for_tokens_array(tokens)
        current = self._columns[slots]
        grows = target > current
        return slots[grows], current[grows], target[grows]

    def _protected_columns(self, slots=None, tokens=None) -> np.ndarray:
        """[max_batch] int64: columns each slot must keep: those covering a live slot's length, or the
        tokens a pending step(needs) asks for, and shared columns; every other mapped column is reclaimable
        (and its pages have no other reference, so reclaiming it frees exactly its pages)."""
        protected = np.where(self._live, self.spec.row_pages_for_tokens_array(self._lengths), 0)
        protected = np.maximum(protected, self._shared)
        if slots is not None and slots.size:
            protected[slots] = np.maximum(protected[slots], self.spec.row_pages_for_tokens_array(tokens))
        return protected

    def _reclaimable_pages(self, protected: np.ndarray | None = None) -> int:
        protected = self._protected_columns() if protected is None else protected
        return int(np.maximum(self._columns - protected, 0).sum()) * self.spec.rows_per_slot

    def pages_needed(self, needs: Mapping[int, int]) -> int:
        """Pool pages step(needs) would map (pages already mapped in the slots count as there)."""
        slots, tokens = self._parse_needs(needs)
        _, current, target = self._growth(slots, tokens)
        return int((target - current).sum()) * self.spec.rows_per_slot

    def can_allocate(self, needs: Mapping[int, int]) -> bool:
        """Whether step(needs) would succeed now: free pages plus pages it may take back (no side effects)."""
        slots, tokens = self._parse_needs(needs)
        _, current, target = self._growth(slots, tokens)
        needed = int((target - current).sum()) * self.spec.rows_per_slot
        return needed <= self._table.num_free + self._reclaimable_pages(self._protected_columns(slots, tokens))

    def _available_pages(self) -> int:
        return self._table.num_free + self._reclaimable_pages()

    def _plan_reclaim(self, shortfall_pages: int, protected: np.ndarray) -> dict[int, int]:
        """{slot: columns it keeps} freeing at least ``shortfall_pages`` pages.

        Idle slots first, in ReclaimPolicy order; then the unused tail columns of live slots (a request
        that inherited a longer one's pages in a deferred slot), largest tail first. Tail columns go first.
        """
        rows = self.spec.rows_per_slot
        idle = np.flatnonzero(~self._live & (self._columns > 0))
        excess = np.maximum(self._columns - protected, 0)
        live = np.flatnonzero(self._live & (excess > 0))
        order = self.reclaim_policy.order(idle, self._columns, self._freed_at)
        order += [int(s) for s in live[np.argsort(-excess[live], kind="stable")]]
        shrink = {}
        for slot in order:
            if shortfall_pages <= 0:
                break
            take = min(int(excess[slot]), -(-shortfall_pages // rows))
            shrink[slot] = int(self._columns[slot]) - take
            shortfall_pages -= take * rows
        return shrink

    def _place(self, g_slots, g_from, g_to) -> tuple[np.ndarray, np.ndarray]:
        """Virtual and physical pages for growing slots: ([n] int64, [n] int64), row after row."""
        spec = self.spec
        virt, lasts, counts = [], [], []
        for slot, first, end in zip(g_slots.tolist(), g_from.tolist(), g_to.tolist()):
            virt.append(spec.slot_virtual_pages(slot, first, end).reshape(-1))
            starts = spec.slot_row_starts(slot)
            lasts.append(self._table.phys[starts + first - 1].astype(np.int64) if first
                         else np.full(starts.shape, -1, dtype=np.int64))
            counts.append(np.full(starts.shape, end - first, dtype=np.int64))
        free = self._table.refcount == 0
        phys = place_pages(free, np.concatenate(lasts), np.concatenate(counts))
        return np.concatenate(virt), phys

    # ---- native calls ---------------------------------------------------------------------
    def _map(self, virt: np.ndarray, phys: np.ndarray) -> None:
        t0 = time.perf_counter()
        self._reservation.map(virt, self._pool, phys)
        c = self._counters
        c["map_seconds"] += time.perf_counter() - t0
        c["map_calls"] += 1
        c["pages_mapped"] += int(virt.size)

    def _unmap(self, virt: np.ndarray) -> None:
        if self.device.type == "cuda":      # never pull pages from under a kernel still reading them
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        self._reservation.unmap(virt)
        c = self._counters
        c["unmap_seconds"] += time.perf_counter() - t0
        c["unmap_calls"] += 1
        c["pages_unmapped"] += int(virt.size)

    def _trim(self, phys: np.ndarray) -> None:
        """Host: punch the pages out of the memfd. CUDA keeps its pooled handles (creating one costs
        ~130 maps), so memory stays with the pool until close()."""
        if phys.size and self._backend.name == "host":
            self._pool.trim(phys)
            self._table.resident[phys] = False
            self._counters["trimmed_pages"] += int(phys.size)

    def _shrink(self, keep: Mapping[int, int], *, trim: bool) -> tuple[np.ndarray, np.ndarray]:
        """Unmap columns [keep[s], columns[s]) of slots in one call. Returns (virt, their phys)."""
        virt = [self.spec.slot_virtual_pages(s, k, int(self._columns[s])).reshape(-1) for s, k in keep.items()]
        virt = np.concatenate(virt) if virt else np.zeros(0, dtype=np.int64)
        if not virt.size:
            return virt, virt
        phys = self._table.phys[virt].astype(np.int64)
        self._unmap(virt)
        released = self._table.clear(virt)
        for s, k in keep.items():
            self._columns[s] = k
            self._inherited[s] = min(int(self._inherited[s]), k)
            self._shared[s] = min(int(self._shared[s]), k)
        if trim:
            self._trim(released)
        return virt, phys

    # ---- step -----------------------------------------------------------------------------
    def step(self, needs: Mapping[int, int]) -> None:
        """Make tokens [0, needs[slot]) of every slot writable, in one native map call.

        Atomic: if the pool (free plus reclaimable pages) cannot cover it, VmemOutOfMemory(needed_pages,
        free_pages) is raised and nothing changes; if the native map fails (map budget, driver), the
        native call rolled back and so does this one (pages taken from idle slots are mapped back).
        """
        slots, tokens = self._parse_needs(needs)
        self._settle()
        if self._shared[slots].any():
            self._check_shared_lengths(slots, tokens)
        g_slots, g_from, g_to = self._growth(slots, tokens)
        rows = self.spec.rows_per_slot
        needed = int((g_to - g_from).sum()) * rows
        # pages this step finds already mapped, left in the slot by an earlier request (deferred reuse)
        inherited = self._inherited[slots]
        had = np.minimum(self.spec.row_pages_for_tokens_array(self._lengths[slots]), inherited)
        reused = int(np.maximum(np.minimum(self.spec.row_pages_for_tokens_array(tokens), inherited) - had,
                                0).sum()) * rows
        free = self._table.num_free
        if needed > free:
            protected = self._protected_columns(slots, tokens)
            available = free + self._reclaimable_pages(protected)
            if needed > available:
                raise VmemOutOfMemory("vmem.step: %d pages needed, %d free or reclaimable" % (needed, available),
                                      needed_pages=needed, free_pages=available, op="vmem.step")
            self._reclaim_for(needed - free, protected)
        if needed:
            virt, phys = self._place(g_slots, g_from, g_to)
            try:
                self._map(virt, phys)
            except BaseException:
                self._after_failed_map(phys)
                raise
            self._table.set(virt, phys)
            self._columns[g_slots] = g_to
        self._reclaimed = None
        self._counters["reused_pages"] += reused
        self._record_lengths(slots, tokens)
        self._note_used(self._table.num_used - self._reclaimable_pages())

    def _reclaim_for(self, shortfall_pages: int, protected: np.ndarray) -> None:
        keep = self._plan_reclaim(shortfall_pages, protected)
        before = {s: (int(self._columns[s]), int(self._inherited[s])) for s in keep}
        virt, phys = self._shrink(keep, trim=False)
        self._counters["reclaimed_pages"] += int(virt.size)
        self._reclaimed = (before, virt, phys)
        logger.debug("reclaimed %d pages from %d idle slots", virt.size, len(keep))

    def _after_failed_map(self, attempted: np.ndarray) -> None:
        """The native map rolled back, but pages it populated before failing may still hold memory:
        trim them; then give idle slots their reclaimed pages back (or, if that fails too, trim those)."""
        reclaimed = self._reclaimed[2] if self._reclaimed is not None else np.zeros(0, dtype=np.int64)
        try:
            self._trim(np.setdiff1d(attempted, reclaimed))
        except VmemError as exc:
            logger.warning("trim after a failed map failed: %s", exc)
        if self._reclaimed is None:
            return
        before, virt, phys = self._reclaimed
        self._reclaimed = None
        try:
            self._map(virt, phys)
        except VmemError:
            self._trim(np.unique(phys))
            return
        self._table.set(virt, phys)
        self._restore_columns(before)

    def _restore_columns(self, before: dict[int, tuple[int, int]]) -> None:
        """Undo a reclaim: slot -> (columns, inherited columns) as they were before it."""
        for s, (cols, inherited) in before.items():
            self._columns[s] = cols
            self._inherited[s] = inherited

    # ---- prefix sharing ---------------------------------------------------------------------
    def share_prefix(self, src_slot: int, dst_slot: int, num_tokens: int) -> int:
        """Map the pages holding tokens [0, num_tokens) of ``src_slot`` into a new request's ``dst_slot``.

        Whole pages only: returns the tokens shared (num_tokens rounded down to a page), which become
        dst's length; dst computes its K/V from there on. The pages are reference-counted, not copied,
        and stay read-only in practice: neither slot may shrink below them (step() refuses), and a slot
        holding shared pages unmaps them when freed instead of keeping them for reuse. Needs whole
        tokens per page (page_bytes a multiple of the row's token bytes). One native map call.

        ::

            src rows: | p0 | p1 | p2 | p3 ...        num_tokens -> k = num_tokens // tokens_per_page pages
            dst rows: | p0 | p1 | p2 | new pages ...  (the same pool pages, refcount 2)
        """
        spec = self.spec
        src, dst = self._check_slot(src_slot), self._check_slot(dst_slot)
        num_tokens = spec.check_num_tokens(num_tokens)
        if src == dst:
            raise VmemInvalidArgument("share_prefix needs two different slots")
        if spec.page_bytes % spec.row_token_bytes:
            raise VmemInvalidArgument("share_prefix needs whole tokens per page (page_bytes %d, token row bytes %d)"
                                      % (spec.page_bytes, spec.row_token_bytes))
        if self._lengths[dst]:
            raise VmemInvalidArgument("share_prefix: slot %d already holds %d tokens" % (dst, self._lengths[dst]))
        if num_tokens > self._lengths[src]:
            raise VmemInvalidArgument("share_prefix: slot %d holds only %d tokens, not %d"
                                      % (src, self._lengths[src], num_tokens))
        self._settle()
        k = num_tokens // int(spec.tokens_per_page)
        if k == 0:
            return 0
        if self._columns[dst]:
            self._shrink({dst: 0}, trim=True)          # pages dst inherited make way for the shared ones
        virt = spec.slot_virtual_pages(dst, 0, k).reshape(-1)
        phys = self._table.phys[spec.slot_virtual_pages(src, 0, k).reshape(-1)].astype(np.int64)
        self._map(virt, phys)
        self._table.set(virt, phys)
        self._columns[dst] = k
        self._inherited[dst] = 0
        self._shared[src] = max(int(self._shared[src]), k)
        self._shared[dst] = k
        shared_tokens = k * int(spec.tokens_per_page)
        self._record_lengths(np.array([dst]), np.array([shared_tokens]))
        return shared_tokens

    def _check_shared_lengths(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        floor = self._shared[slots] * int(self.spec.tokens_per_page)
        if np.any(tokens < floor):
            bad = int(np.flatnonzero(tokens < floor)[0])
            raise VmemInvalidArgument("slot %d shares its first %d tokens with another request; it cannot "
                                      "shrink to %d" % (slots[bad], floor[bad], tokens[bad]))

    def reclaim_idle(self) -> int:
        """Unmap every reclaimable page now (idle slots' pages, live slots' columns beyond their length)
        and return the memory to the OS. Returns the pages released."""
        self._check_open()
        self._settle()
        protected = self._protected_columns()
        protected[~self._live] = 0             # freed slots whose shared pages could not be unmapped: retry
        keep = {int(s): int(protected[s]) for s in np.flatnonzero(self._columns > protected)}
        virt, _ = self._shrink(keep, trim=True)
        self._counters["reclaimed_pages"] += int(virt.size)
        return int(virt.size)

    # ---- async ----------------------------------------------------------------------------
    def prefetch(self, needs: Mapping[int, int]) -> None:
        """Start mapping what step(needs) will need on the native worker and return at once.

        When free pages do not cover it, the pages step() would take back from idle slots are unmapped
        by the worker first (one unmap job, then the map job; the queue is FIFO) - on the host only: on
        CUDA an unmap must wait for kernels, so step() does it. If even that cannot cover it (step will
        raise VmemOutOfMemory), or the cache is synchronous, this does nothing.
        """
        slots, tokens = self._parse_needs(needs)
        if self._mapper is None:
            return
        self._settle()
        g_slots, g_from, g_to = self._growth(slots, tokens)
        needed = int((g_to - g_from).sum()) * self.spec.rows_per_slot
        free = self._table.num_free
        if not needed:
            return
        reclaim = None
        if needed > free:
            protected = self._protected_columns(slots, tokens)
            if self.device.type == "cuda" or needed > free + self._reclaimable_pages(protected):
                return
            keep = self._plan_reclaim(needed - free, protected)
            before = {s: (int(self._columns[s]), int(self._inherited[s])) for s in keep}
            rvirt = np.concatenate([self.spec.slot_virtual_pages(s, k, before[s][0]).reshape(-1)
                                    for s, k in keep.items()])
            rphys = self._table.phys[rvirt].astype(np.int64)
            uticket = self._mapper.submit_unmap(self._reservation, rvirt)
            self._table.clear(rvirt)
            for s, k in keep.items():
                self._columns[s] = k
                self._inherited[s] = min(int(self._inherited[s]), k)
            reclaim = (uticket, before, rvirt, rphys)
            self._counters["reclaimed_pages"] += int(rvirt.size)
        virt, phys = self._place(g_slots, g_from, g_to)
        try:
            ticket = self._mapper.submit(self._reservation, virt, self._pool, phys)
        except BaseException:
            if reclaim is not None:            # the unmap is queued: settle it now, keep or undo its plan
                self._settle_reclaim(reclaim)
            raise
        self._table.set(virt, phys)
        self._pending = (ticket, virt, phys, g_slots, g_from, reclaim)
        self._columns[g_slots] = g_to
        self._counters["prefetch_pages"] += int(virt.size)

    def _settle_reclaim(self, reclaim) -> None:
        """Wait for a prefetch's unmap job alone (its map job was never queued): keep the reclaim if it ran,
        else give the slots their pages back in the page table (the native call rolled back)."""
        uticket, before, rvirt, rphys = reclaim
        try:
            self._mapper.wait(uticket)
        except VmemError as exc:
            logger.warning("prefetch unmap failed (%s); the slots keep their pages", exc)
            self._table.set(rvirt, rphys)
            self._restore_columns(before)
            return
        self._counters["unmap_calls"] += 1
        self._counters["pages_unmapped"] += int(rvirt.size)

    def _settle(self) -> None:
        """Wait for a prefetch in flight (only blocks if the worker is behind); undo what failed.

        Unmap job failed: the idle slots keep their pages (the native call rolled back), so the plan is
        undone here, including the map job if it went through (unmapped again, synchronously). Map job
        failed: its pages go back to the pool (trimmed); the reclaim, if any, stands.
        """
        if self._pending is None:
            return
        ticket, virt, phys, g_slots, g_from, reclaim = self._pending
        self._pending = None
        t0 = time.perf_counter()
        unmap_error = map_error = None
        try:
            if reclaim is not None:
                try:
                    self._mapper.wait(reclaim[0])
                    self._counters["unmap_calls"] += 1
                    self._counters["pages_unmapped"] += int(reclaim[2].size)
                except VmemError as exc:
                    unmap_error = exc
            try:
                self._mapper.wait(ticket)
            except VmemError as exc:
                map_error = exc
        finally:
            self._counters["async_wait_seconds"] += time.perf_counter() - t0
        if map_error is None and unmap_error is None:
            self._counters["map_calls"] += 1
            self._counters["pages_mapped"] += int(virt.size)
            return
        self._counters["prefetch_failures"] += 1
        logger.warning("prefetch of %d pages failed (%s); step() will map them", virt.size, unmap_error or map_error)
        if map_error is None:                  # mapped over pages the idle slots still hold: take it back
            try:
                self._unmap(virt)
            except VmemError as exc:           # keep the aliases, counted: the page table says what is mapped
                logger.warning("could not undo a prefetch after its unmap failed (%s)", exc)
                if unmap_error is not None:
                    self._table.set(reclaim[2], reclaim[3])
                    self._restore_columns(reclaim[1])
                return
        self._table.clear(virt)
        self._columns[g_slots] = g_from
        if unmap_error is not None:
            self._table.set(reclaim[2], reclaim[3])
            self._restore_columns(reclaim[1])
        self._trim(np.flatnonzero((self._table.refcount == 0) & self._table.resident))

    # ---- statistics and checks --------------------------------------------------------------
    def stats(self) -> CacheStats:
        reclaimable = self._reclaimable_pages()
        used = self._table.num_used - reclaimable          # physical pages: a shared page counts once
        return self._stats(page_bytes=self.spec.page_bytes, total_pages=self.num_pool_pages, used_pages=used,
                           reclaimable_pages=reclaimable, os_mappings=int(self._reservation.num_mappings))

    @property
    def counters(self) -> dict:
        """Raw counters, including the async ones (prefetch_pages, prefetch_failures, async_wait_seconds)."""
        return dict(self._counters)

    def check_integrity(self) -> None:
        """Verify the invariants of the class docstring; raise VmemIntegrityError listing what is wrong."""
        self._check_open()
        self._settle()
        spec, table = self.spec, self._table
        problems = table.check()
        shape = (spec.num_planes, spec.max_batch, spec.rows_per_plane, spec.pages_per_row)
        mapped = (table.phys != UNMAPPED).reshape(shape)
        expected = np.arange(spec.pages_per_row)[None, None, None, :] < self._columns[None, :, None, None]
        wrong = mapped != expected
        if wrong.any():
            bad = np.flatnonzero(wrong.any(axis=(0, 2, 3)))
            problems.append("slots %s: mapped pages are not the first columns[s] pages of each row" % bad.tolist())
        needed = spec.row_pages_for_tokens_array(self._lengths)
        short = np.flatnonzero(self._live & (self._columns < needed))
        if short.size:
            problems.append("live slots %s have fewer mapped columns than their lengths need" % short.tolist())
        if np.any(self._lengths[~self._live]):
            problems.append("a free slot has a length")
        if self.reclaim == "eager":
            left = set(np.flatnonzero(~self._live & (self._columns > 0)).tolist()) - self._eager_leftovers
            if left:
                problems.append("eager reclamation left pages in free slots %s" % sorted(left))
        shared_pages = np.flatnonzero(table.refcount > 1)
        if shared_pages.size:
            refs = np.isin(table.phys, shared_pages).reshape(shape)
            outside = refs & (np.arange(spec.pages_per_row)[None, None, None, :]
                              >= self._shared[None, :, None, None])
            if outside.any():
                problems.append("pages with several references outside the shared columns of slots %s"
                                % np.flatnonzero(outside.any(axis=(0, 2, 3))).tolist())
        s = self.stats()
        if s.used_pages + s.reclaimable_pages + s.free_pages != s.total_pages or s.mapped_pages != table.num_used:
            problems.append("used %d + reclaimable %d + free %d != %d pages, or mapped %d != page table %d"
                            % (s.used_pages, s.reclaimable_pages, s.free_pages, s.total_pages, s.mapped_pages,
                               table.num_used))
        problems += self._check_backend()
        if problems:
            raise VmemIntegrityError("; ".join(problems))

    def _check_backend(self) -> list[str]:
        problems = []
        table = self._table
        theirs = self._reservation.mapping(0, table.phys.size)
        if not np.array_equal(theirs, table.phys.astype(np.int64)):
            bad = np.flatnonzero(theirs != table.phys)[:5]
            problems.append("the backend's table differs at virtual pages %s" % bad.tolist())
        runs = table.expected_mappings(coalesce_phys=self._backend.name == "host")
        if int(self._reservation.num_mappings) != runs:
            problems.append("the backend holds %d mappings, the page table implies %d"
                            % (self._reservation.num_mappings, runs))
        resident = self._pool.resident_bytes()
        if resident is not None and resident >= 0:
            ours = int(np.count_nonzero(table.resident)) * self.spec.page_bytes
            if resident != ours:
                problems.append("the OS backs %d bytes of the pool, the page table says %d" % (resident, ours))
        return problems

    def close(self) -> None:
        """Wait for the worker, unmap everything and release the reservation and the pool."""
        if self._closed:
            return
        try:
            self._settle()
        finally:
            self._closed = True
            if self._mapper is not None:
                self._mapper.close()
            try:
                if self.device.type == "cuda":    # releasing unmaps every page: no kernel may still read one
                    torch.cuda.synchronize(self.device)
            finally:
                self._planes = []
                self._reservation.close()
                self._pool.close()


def _open_backend(backend, device):
    if isinstance(backend, str):
        from vmem.backends import get_backend
        return get_backend(backend) if device is None else get_backend(backend, device=_device_index(device))
    return backend


def _device_index(device) -> int:
    if isinstance(device, int):
        return device
    device = torch.device(device)
    return device.index or 0
