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

Elastic (``budget=``): the pool draws pages from a Budget shared with other caches and processes and
gives idle ones back under a BudgetPolicy; ``maintain()`` applies it (ElasticPages, elastic.py).

Prefix caching (Note [Prefix caching by page aliasing] in prefix.py): full columns whose K/V a request
computed enter a radix tree of columns that holds its own reference to their pages; ``alloc_slot(
token_ids=...)`` attaches the longest cached prefix of a prompt to the slot, preferring the free slot
that still maps it (no map call at all), and the next ``step`` maps the rest of it together with the
step's growth, in the same single native call. Cached pages are freed by evicting them from the index,
least recently used leaf first, when free and reclaimable slot pages do not cover a step. The slot
side of this lives in PrefixSlots (prefix_slots.py).

Threads and interrupts (base.py): the public methods run under one lock; a call cut short by an exception
other than a VmemError (a KeyboardInterrupt between a native call and its record) ends in ``_recover()``,
which re-reads the page table from the backend and derives the columns from it.

Limitations: pages shared between slots by share_prefix are never counted as reclaimable, and do not
enter the prefix index.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from vmem.allocator.base import SlotCache, check_memory_bytes, synchronized, transaction
from vmem.allocator.elastic import BudgetPolicy, ElasticPages, IdleClock, free_mask, open_lease
from vmem.allocator.mapping import RECLAIM_MODES, PageMapper, check_reclaim_mode, synchronize_for_unmap
from vmem.allocator.page_table import UNMAPPED
from vmem.allocator.planning import ColumnPlanner, Growth, Reclaim
from vmem.allocator.policy import ReclaimPolicy, SlotPolicy, get_reclaim_policy
from vmem.allocator.prefetch import Prefetch, Prefetcher
from vmem.allocator.prefix import PrefixIndex, PrefixNode
from vmem.allocator.prefix_slots import PrefixSlots
from vmem.allocator.spec import KVCacheSpec
from vmem.allocator.stats import CacheStats
from vmem.errors import VmemError, VmemIntegrityError, VmemInvalidArgument, VmemOutOfMemory

logger = logging.getLogger(__name__)

__all__ = ["RECLAIM_MODES", "VirtualKVCache"]


class VirtualKVCache(PrefixSlots, ElasticPages, SlotCache):
    """KV cache over virtual memory (host memfd/mmap or CUDA VMM), see the module docstring.

    The parts: ``_pages`` (mapping.PageMapper: reservation, pool, page table, the native calls),
    ``_cols`` (planning.ColumnPlanner: columns per slot and the pure planning), ``_prefetcher``
    (prefetch.Prefetcher, async only). Every change of mapped pages goes through one apply/undo pair
    per record: ``_apply_growth`` / ``_undo_growth`` and ``_apply_reclaim`` / ``_undo_reclaim``.

    Invariants (``check_integrity()`` verifies them; tests call it after every operation):
      1. the page table is consistent: reference counts equal the virtual pages mapping each pool page,
         and a pool page is free iff its count is 0 (PageTable.check);
      2. every row of slot s has exactly columns[s] mapped pages, and they are its first ones;
      3. a live slot's columns cover its length: columns[s] >= row_pages_for_tokens(length[s]);
         a free slot has length 0, and in eager mode no pages;
      4. used + reclaimable + free == pool pages (used: the columns covering live slots' lengths;
         reclaimable: idle slots' pages and live slots' columns beyond their lengths);
      5. a pool page mapped more than once (a shared prefix) lies in the first shared[s] or cached[s]
         columns of the slots that map it, which are protected from reclamation and from shrinking;
      6. prefix index: reference counts include its holds, which are exactly its nodes' pages; slot s's
         first cached[s] columns map a root path of the index (path[s]); an index page is mapped nowhere
         else, so no slot can write one: a live slot's cached columns lie below num_cached_tokens(s),
         attention() refuses to write there and step() to shrink below it; a node is locked exactly by
         the live slots whose path (or pending attachment) holds it;
      7. the backend agrees: its own table reads back as ours, it holds as many mappings as our runs
         imply, and the OS backs exactly the resident pool pages (host: memfd st_blocks).
    """

    kind = "vmem"

    def __init__(self, spec: KVCacheSpec, *, memory_bytes: int | None = None, backend="auto", device=None,
                 reclaim: str = "deferred", async_map: bool = False, reclaim_policy: str | ReclaimPolicy = "lru",
                 budget=None, budget_policy: BudgetPolicy | None = None, prefix_caching: bool | None = None):
        """budget: None, or a Budget / Lease / budget name or path (elastic.py): pages are then charged to
        the shared budget as step maps them; memory_bytes (default: the budget's limit) bounds the pool.
        prefix_caching: None = on when a page holds whole tokens (Note [Prefix caching by page aliasing])."""
        super().__init__(spec, spec.max_batch, None)
        whole_tokens = spec.page_bytes % spec.row_token_bytes == 0
        if prefix_caching and not whole_tokens:
            raise VmemInvalidArgument("prefix caching needs whole tokens per page (page_bytes %d, token row bytes "
                                      "%d); pass prefix_caching=False" % (spec.page_bytes, spec.row_token_bytes))
        self.prefix_caching = whole_tokens if prefix_caching is None else bool(prefix_caching)
        self.reclaim = check_reclaim_mode(reclaim)
        self.reclaim_policy = get_reclaim_policy(reclaim_policy)
        self.slot_policy = SlotPolicy()
        self.budget_policy = budget_policy if budget_policy is not None else BudgetPolicy()
        self._lease, self._own_lease = (None, False) if budget is None else open_lease(
            budget, self.budget_policy, "vmem-%d" % id(self))
        try:
            self._init_pool(spec, memory_bytes, backend, device, async_map)
        except BaseException:
            if self._own_lease:
                self._lease.close()
            raise

    def _init_pool(self, spec, memory_bytes, backend, device, async_map: bool) -> None:
        memory_bytes = check_memory_bytes(memory_bytes)
        if memory_bytes is None and self._lease is not None:
            pool_pages = min(self._lease.info().limit_bytes // spec.page_bytes, spec.num_virtual_pages)
        elif memory_bytes is None:
            pool_pages = spec.num_virtual_pages
        else:
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
            elastic = {} if self._lease is None else {"lease": self._lease}
            self._pool = self._backend.create_pool(spec.page_bytes, pool_pages, max_pages=pool_pages, **elastic)
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
        self._counters.update(prefetch_pages=0, prefetch_failures=0, async_wait_seconds=0.0, trimmed_pages=0)
        self._pages = PageMapper(self._backend, self._reservation, self._pool, pool_pages, self._counters)
        self._table = self._pages.table
        self._cols = ColumnPlanner(spec, self._live, self._lengths, self.reclaim_policy)
        self._clock = 0
        self._prefetcher = Prefetcher(self._backend.async_mapper(), self._pages) if async_map else None
        self._eager_leftovers = set()   # eager mode: free slots whose unmap failed (pages kept, reclaimable)
        self._idle = IdleClock()
        self._last_maintain = 0.0
        self._tpp = int(spec.tokens_per_page) if self.prefix_caching else 0
        self._index = PrefixIndex(max(self._tpp, 1))
        self._paths: list[list[PrefixNode]] = [[] for _ in range(spec.max_batch)]   # valid: [:cols.cached[s]]
        self._attach: dict[int, list[PrefixNode]] = {}   # slot -> nodes its next step maps after its path
        self._wanted: list[PrefixNode] = []              # the match alloc_slot is placing
        self._counters.update(prefix_mapped_pages=0, prefix_inplace_pages=0, prefix_map_calls=0,
                              prefix_unmap_calls=0, prefix_cached_pages=0, prefix_evicted_pages=0, kv_bytes_copied=0)

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
    @synchronized
    def num_free_slots(self) -> int:
        """Free slots a request can get (a freed slot still holding shared pages waits for their unmap)."""
        self._check_open()
        return int(np.count_nonzero(~self._live & (self._cols.shared == 0)))

    @transaction
    def alloc_slot(self, num_tokens: int | None = None, token_ids=None) -> int:
        if self._cols.shared.any() and not self.num_free_slots:
            self.reclaim_idle()               # retry unmapping shared pages left in freed slots
        self._settle()
        self._wanted = []
        if self.prefix_caching and token_ids is not None:
            ids = self._check_token_ids(token_ids)
            self._wanted = self._index.match(ids, (len(ids) - 1) // self._tpp)
        try:
            slot = super().alloc_slot(num_tokens, token_ids)
        finally:
            self._wanted = []
        if self._cols.cached[slot] and not self._cached_tokens[slot]:
            self._shrink({slot: 0}, trim=True)    # cached pages this request would write over: unmapped here
            self._counters["prefix_unmap_calls"] += 1
        self._cols.inherited[slot] = self._cols.columns[slot]
        self._idle.update(1)
        return slot

    def _release_slot(self, slot: int) -> None:
        self._settle()
        self._idle.update(int(np.count_nonzero(self._live)))       # free_slot freed the slot first
        self._drop_prefix(slot)           # its cached columns stay mapped (deferred): a later match lands here
        self._clock += 1
        self._cols.freed_at[slot] = self._clock
        self._eager_leftovers.discard(slot)
        if self._cols.shared[slot]:
            # The next request in this slot would write over pages another request reads: unmap now.
            try:
                self._shrink({slot: 0}, trim=True)
            except VmemError as exc:   # the slot waits (num_free_slots skips it) until an unmap succeeds
                logger.warning("unmap of shared pages of slot %d failed (%s); retried later", slot, exc)
            return
        if self.reclaim == "eager" and self._cols.columns[slot]:
            try:
                self._shrink({slot: 0}, trim=True)
            except VmemError as exc:   # e.g. the mapping budget: keep the pages as deferred, lose nothing
                self._eager_leftovers.add(slot)
                logger.warning("eager unmap of slot %d failed (%s); its pages stay mapped until reclaimed", slot, exc)

    # ---- planning (pure; planning.py) ---------------------------------------------------------
    @synchronized
    def pages_needed(self, needs: Mapping[int, int]) -> int:
        """Pool pages step(needs) would take from the free pool (pages already mapped in the slots, and
        cached pages attached to them, count as there)."""
        slots, tokens = self._parse_needs(needs)
        return self._fresh_pages(slots, tokens)

    def _fresh_pages(self, slots: np.ndarray, tokens: np.ndarray) -> int:
        attached = sum(len(self._attach[s]) for s in slots.tolist() if s in self._attach)
        return max(self._cols.pages_to_map(slots, tokens) - attached * self.spec.rows_per_slot, 0)

    def _reclaimable(self, protected: np.ndarray | None = None) -> int:
        """Pages a step may take back: slots' unprotected columns, then unlocked index columns."""
        return self._cols.reclaimable_pages(protected) + self._index.num_evictable * self.spec.rows_per_slot

    @synchronized
    def can_allocate(self, needs: Mapping[int, int]) -> bool:
        """Whether step(needs) would succeed now: free pages plus pages it may take back (no side effects)."""
        slots, tokens = self._parse_needs(needs)
        needed = self._fresh_pages(slots, tokens)
        return needed <= self._free_pages() + self._reclaimable(self._cols.protected(slots, tokens))

    def _available_pages(self) -> int:
        return self._free_pages() + self._reclaimable()

    def _free_pages(self) -> int:
        """Free pool pages step may map now: with a budget, those holding memory plus the budget's room."""
        if self._lease is None:
            return self._table.num_free
        table = self._table
        holding = int(np.count_nonzero((table.refcount == 0) & table.resident))
        room = self._lease.info().free_bytes // self.spec.page_bytes
        return min(table.num_free, holding + room)

    def _plan_growth(self, slots: np.ndarray, tokens: np.ndarray, needed: int) -> Growth:
        free = None if self._lease is None else free_mask(self._table.refcount, self._table.resident, needed)
        return self._cols.plan_growth(slots, tokens, self._table, free=free)

    # ---- the apply/undo pair of each record ----------------------------------------------------
    # The page table half and the column half of a change, in one place. Native calls are the
    # caller's: apply after the backend did the change (or was handed it, async), undo after the
    # backend did not (or was made to take it back).
    def _apply_growth(self, growth: Growth) -> None:
        self._table.set(growth.virt, growth.phys)
        self._cols.grow(growth)

    def _undo_growth(self, growth: Growth) -> None:
        self._table.clear(growth.virt)
        self._cols.ungrow(growth)
        self._pages.trim_unreferenced()

    def _apply_reclaim(self, reclaim: Reclaim) -> np.ndarray:
        """Returns the pool pages the reclaim released (no other reference)."""
        released = self._table.clear(reclaim.virt)
        self._cols.shrink(reclaim.keep)
        for s, k in reclaim.keep.items():      # the slot no longer maps its cached columns from k on
            for node in self._paths[s][k:reclaim.before[s].cached]:
                node.slots.discard(s)
        return released

    def _undo_reclaim(self, reclaim: Reclaim) -> None:
        self._table.set(reclaim.virt, reclaim.phys)
        for s, k in reclaim.keep.items():
            for node in self._paths[s][k:reclaim.before[s].cached]:
                node.slots.add(s)
        self._cols.restore(reclaim.before)

    # ---- synchronous changes ------------------------------------------------------------------
    def _shrink(self, keep: Mapping[int, int], *, trim: bool) -> Reclaim:
        """Unmap columns [keep[s], columns[s]) of slots in one call. Returns the record."""
        reclaim = self._cols.reclaim(dict(keep), self._table)
        if not reclaim.num_pages:
            return reclaim
        self._pages.native_unmap(reclaim.virt)
        released = self._apply_reclaim(reclaim)
        if trim:
            self._pages.trim(released)
        return reclaim

    @transaction
    def step(self, needs: Mapping[int, int]) -> None:
        """Make tokens [0, needs[slot]) of every slot writable, in one native map call.

        The call maps the cached pages attached to new requests (alloc_slot(token_ids=...)) and the
        fresh pages of the growth together::

            slot s:  [0, cached)      mapped already (its path in the prefix index)
                     [cached, k)      attached index pages  -+- one native call
                     [k, target)      fresh pool pages      -+  (k: end of the attached columns)

        Atomic: if the pool (free plus reclaimable pages, cached ones included) cannot cover it,
        VmemOutOfMemory(needed_pages, free_pages) is raised and nothing changes; if the native map fails
        (map budget, driver), the native call rolled back and so does this one (pages taken from idle
        slots are mapped back, evicted index columns put back).
        """
        slots, tokens = self._parse_needs(needs)
        self._settle()
        if self._cols.shared[slots].any() or self._cached_tokens[slots].any():
            self._check_shared_lengths(slots, tokens)
        needed = self._fresh_pages(slots, tokens)
        reused = self._cols.reused_pages(slots, tokens)
        free = self._free_pages()
        reclaim, evicted = None, []
        if needed > free:
            protected = self._cols.protected(slots, tokens)
            available = free + self._reclaimable(protected)
            if needed > available:
                if self._lease is not None and free < self._table.num_free:   # the budget is what is short
                    self._lease.set_demand((needed - available) * self.spec.page_bytes)
                raise VmemOutOfMemory("vmem.step: %d pages needed, %d free or reclaimable" % (needed, available),
                                      needed_pages=needed, free_pages=available, op="vmem.step")
            reclaim, evicted = self._reclaim_for(needed - free, protected)
        attach = [(s, self._attach[s]) for s in slots.tolist() if s in self._attach]
        if needed or attach:
            avirt, aphys = self._attachment_pages(attach)
            self._table.set(avirt, aphys)          # so the growth continues after the attached columns
            for s, nodes in attach:
                self._cols.columns[s] += len(nodes)
            growth = self._plan_growth(slots, tokens, needed)
            try:
                self._pages.native_map(np.concatenate([avirt, growth.virt]), np.concatenate([aphys, growth.phys]))
            except VmemError:                  # the native call rolled back (anything else: _recover)
                self._table.clear(avirt)
                for s, nodes in attach:
                    self._cols.columns[s] -= len(nodes)
                self._after_failed_map(growth, reclaim, evicted)
                raise
            self._table.set(growth.virt, growth.phys)
            self._cols.grow(growth)
            self._realize_attachments(attach, avirt.size)
        self._counters["reused_pages"] += reused
        self._record_lengths(slots, tokens)
        self._note_used(self._table.num_used - self._reclaimable())

    def _reclaim_for(self, shortfall_pages: int, protected: np.ndarray):
        """Take back ``shortfall_pages``: slots' unprotected columns first (planning.plan_reclaim), then
        index columns, least recently used leaf first (unmapped from the idle slots that still map them,
        their holds dropped). One unmap call. Returns (Reclaim, evicted nodes)."""
        rows = self.spec.rows_per_slot
        keep = self._cols.plan_reclaim(shortfall_pages, protected)
        taken = sum(int(self._cols.columns[s]) - k for s, k in keep.items()) * rows
        evicted = []
        if taken < shortfall_pages:
            evicted = self._index.plan_eviction(-(-(shortfall_pages - taken) // rows))
            for node in evicted:
                for s in node.slots:
                    keep[s] = min(keep.get(s, int(self._cols.columns[s])), node.column)
        reclaim = self._shrink(keep, trim=False)
        self._evict(evicted)
        self._counters["reclaimed_pages"] += reclaim.num_pages
        logger.debug("reclaimed %d pages from %d slots, evicted %d cached columns", reclaim.num_pages,
                     len(reclaim.keep), len(evicted))
        return reclaim, evicted

    def _after_failed_map(self, growth: Growth, reclaim: Reclaim | None, evicted=()) -> None:
        """The native map rolled back, but pages it populated before failing may still hold memory:
        trim them; give the index its evicted columns back (nothing wrote them: their data is intact),
        then idle slots their reclaimed pages (or, if that remap fails too, trim the unreferenced ones)."""
        kept = [reclaim.phys] if reclaim is not None else []
        kept += [n.phys for n in evicted]
        try:
            self._pages.trim(np.setdiff1d(growth.phys, np.concatenate(kept)) if kept else growth.phys)
        except VmemError as exc:
            logger.warning("trim after a failed map failed: %s", exc)
        if evicted:
            self._table.hold(np.concatenate([n.phys for n in evicted]))
            self._index.restore(evicted)
            self._counters["prefix_evicted_pages"] -= len(evicted) * self.spec.rows_per_slot
        if reclaim is None or not reclaim.num_pages:
            return
        try:
            self._pages.native_map(reclaim.virt, reclaim.phys)
        except VmemError:
            phys = np.unique(reclaim.phys)
            self._pages.trim(phys[self._table.refcount[phys] == 0])
            return
        self._undo_reclaim(reclaim)

    # ---- prefix sharing ---------------------------------------------------------------------
    @transaction
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
        cols = self._cols
        self._drop_prefix(dst)                         # a prefix attached at alloc_slot gives way
        self._cached_tokens[dst] = 0
        if cols.columns[dst]:
            self._shrink({dst: 0}, trim=True)          # pages dst inherited make way for the shared ones
        virt = spec.slot_virtual_pages(dst, 0, k).reshape(-1)
        phys = self._table.phys[spec.slot_virtual_pages(src, 0, k).reshape(-1)].astype(np.int64)
        self._pages.map(virt, phys)
        cols.columns[dst] = k
        cols.inherited[dst] = 0
        cols.shared[src] = max(int(cols.shared[src]), k)
        cols.shared[dst] = k
        c = min(k, int(cols.cached[src]))              # src's cached columns are cached columns of dst too
        self._paths[dst] = self._paths[src][:c]
        cols.cached[dst] = c
        for node in self._paths[dst]:
            node.slots.add(dst)
        self._index.lock(self._paths[dst])
        self._cached_tokens[dst] = c * int(spec.tokens_per_page)
        shared_tokens = k * int(spec.tokens_per_page)
        self._record_lengths(np.array([dst]), np.array([shared_tokens]))
        return shared_tokens

    def _check_shared_lengths(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        floor = np.maximum(self._cols.shared[slots] * int(self.spec.tokens_per_page), self._cached_tokens[slots])
        if np.any(tokens < floor):
            bad = int(np.flatnonzero(tokens < floor)[0])
            raise VmemInvalidArgument("slot %d shares its first %d tokens with other requests (a shared or cached "
                                      "prefix); it cannot shrink to %d" % (slots[bad], floor[bad], tokens[bad]))

    @transaction
    def reclaim_idle(self) -> int:
        """Unmap every reclaimable page now (idle slots' pages, live slots' columns beyond their length),
        evict every unlocked column of the prefix index, and return the memory to the OS. Returns the
        pages released."""
        self._check_open()
        self._settle()
        cols = self._cols
        protected = cols.protected()
        protected[~self._live] = 0             # freed slots whose shared pages could not be unmapped: retry
        keep = {int(s): int(protected[s]) for s in np.flatnonzero(cols.columns > protected)}
        free = self._table.num_free
        reclaim = self._shrink(keep, trim=True)
        self._pages.trim(self._evict(self._index.plan_eviction(self._index.num_evictable)))
        self._counters["reclaimed_pages"] += reclaim.num_pages
        return self._table.num_free - free

    # ---- async ----------------------------------------------------------------------------
    @transaction
    def prefetch(self, needs: Mapping[int, int]) -> None:
        """Start mapping what step(needs) will need on the native worker and return at once.

        When free pages do not cover it, the pages step() would take back from idle slots are unmapped
        by the worker first (one unmap job, then the map job; the queue is FIFO) - on the host only: on
        CUDA an unmap must wait for kernels, so step() does it. If even that cannot cover it (step will
        raise VmemOutOfMemory), or the cache is synchronous, this does nothing.
        """
        slots, tokens = self._parse_needs(needs)
        if self._prefetcher is None or any(s in self._attach for s in slots.tolist()):
            return                             # attached prefixes are mapped by step(), with its growth
        self._settle()
        cols = self._cols
        needed = cols.pages_to_map(slots, tokens)
        if not needed:
            return
        free = self._free_pages()
        reclaim = uticket = None
        if needed > free:
            protected = cols.protected(slots, tokens)
            if self.device.type == "cuda" or needed > free + cols.reclaimable_pages(protected):
                return
            reclaim = cols.reclaim(cols.plan_reclaim(needed - free, protected), self._table)
            uticket = self._prefetcher.submit_unmap(reclaim)
            self._apply_reclaim(reclaim)
            self._counters["reclaimed_pages"] += reclaim.num_pages
        growth = self._plan_growth(slots, tokens, needed)
        try:
            ticket = self._prefetcher.submit_map(growth)
        except VmemError:                      # not queued (anything else: _recover)
            if reclaim is not None:            # the unmap is queued: settle it now, keep or undo its plan
                if self._prefetcher.wait_unmap(uticket, reclaim) is not None:
                    logger.warning("prefetch unmap failed; the slots keep their pages")
                    self._undo_reclaim(reclaim)
            raise
        self._apply_growth(growth)
        self._prefetcher.pending = Prefetch(ticket, growth, uticket, reclaim)
        self._counters["prefetch_pages"] += growth.num_pages

    def _settle(self) -> None:
        """Wait for a prefetch in flight (only blocks if the worker is behind); undo what failed.

        Unmap job failed: the idle slots keep their pages (the native call rolled back), so the plan is
        undone here, including the map job if it went through (unmapped again, synchronously). Map job
        failed: its pages go back to the pool (trimmed); the reclaim, if any, stands.
        """
        if self._prefetcher is None:
            return
        settled = self._prefetcher.settle()
        if settled is None or settled.ok:
            return
        growth, reclaim = settled.prefetch.growth, settled.prefetch.reclaim
        self._counters["prefetch_failures"] += 1
        logger.warning("prefetch of %d pages failed (%s); step() will map them", growth.num_pages,
                       settled.unmap_error or settled.map_error)
        if settled.map_error is None:          # mapped over pages the idle slots still hold: take it back
            try:
                self._pages.native_unmap(growth.virt)
            except VmemError as exc:           # keep the aliases, counted: the page table says what is mapped
                logger.warning("could not undo a prefetch after its unmap failed (%s)", exc)
                self._undo_reclaim(reclaim)
                return
        if settled.unmap_error is not None:    # first: the idle slots' pages are mapped, keep them from the trim
            self._undo_reclaim(reclaim)
        self._undo_growth(growth)

    # ---- interrupt safety -----------------------------------------------------------------------
    def _recover(self) -> None:
        """Make every record agree with the backend again after a transaction was cut short by an
        exception other than a VmemError (a KeyboardInterrupt between a native call and its record, or
        in the middle of a page table update): let the worker finish what it was handed, re-read the
        page table from the backend (PageMapper.resync), and derive the slots' columns from it."""
        if self._prefetcher is not None:
            try:
                self._settle()
            except Exception as exc:           # the recovery below does not need it
                logger.warning("settling a prefetch during recovery failed: %s", exc)
            self._prefetcher.pending = None
            if self._prefetcher.mapper.pending:   # jobs whose tickets were lost: closing waits for them
                self._prefetcher.close()
                self._prefetcher.mapper = self._backend.async_mapper()
        self._pages.resync()
        self._cols.resync(self._table)
        if self.reclaim == "eager":            # free slots still holding pages: reclaimable, as after a failed unmap
            self._eager_leftovers |= set(np.flatnonzero(~self._live & (self._cols.columns > 0)).tolist())
        logger.warning("vmem: recovered the cache's state from the backend after an interrupted call")

    # ---- statistics and checks --------------------------------------------------------------
    @synchronized
    def stats(self) -> CacheStats:
        reclaimable = self._reclaimable()
        used = self._table.num_used - reclaimable          # physical pages: a shared page counts once
        s = self._stats(page_bytes=self.spec.page_bytes, total_pages=self.num_pool_pages, used_pages=used,
                        reclaimable_pages=reclaimable, os_mappings=int(self._reservation.num_mappings))
        if self._lease is None:
            return s
        info, page_bytes = self._lease.info(), self.spec.page_bytes
        return s._replace(budget_limit_pages=info.limit_bytes // page_bytes,
                          budget_held_pages=info.held_bytes // page_bytes,
                          budget_total_held_pages=info.total_held_bytes // page_bytes,
                          budget_waiting_pages=-(-info.waiting_bytes // page_bytes),
                          budget_others_waiting_pages=-(-info.others_waiting_bytes // page_bytes),
                          budget_peak_pages=info.peak_bytes // page_bytes)

    @property
    @synchronized
    def counters(self) -> dict:
        """Raw counters, including the async ones (prefetch_pages, prefetch_failures, async_wait_seconds)."""
        return dict(self._counters)

    @transaction
    def check_integrity(self) -> None:
        """Verify the invariants of the class docstring; raise VmemIntegrityError listing what is wrong."""
        self._check_open()
        self._settle()
        spec, table, cols = self.spec, self._table, self._cols
        problems = self._pages.check()
        shape = (spec.num_planes, spec.max_batch, spec.rows_per_plane, spec.pages_per_row)
        mapped = (table.phys != UNMAPPED).reshape(shape)
        expected = np.arange(spec.pages_per_row)[None, None, None, :] < cols.columns[None, :, None, None]
        wrong = mapped != expected
        if wrong.any():
            bad = np.flatnonzero(wrong.any(axis=(0, 2, 3)))
            problems.append("slots %s: mapped pages are not the first columns[s] pages of each row" % bad.tolist())
        needed = spec.row_pages_for_tokens_array(self._lengths)
        short = np.flatnonzero(self._live & (cols.columns < needed))
        if short.size:
            problems.append("live slots %s have fewer mapped columns than their lengths need" % short.tolist())
        if np.any(self._lengths[~self._live]):
            problems.append("a free slot has a length")
        if self.reclaim == "eager":
            left = set(np.flatnonzero(~self._live & (cols.columns > 0)).tolist()) - self._eager_leftovers
            if left:
                problems.append("eager reclamation left pages in free slots %s" % sorted(left))
        column = np.arange(spec.pages_per_row)[None, None, None, :]
        shared_pages = np.flatnonzero(table.refcount - table.held > 1)
        if shared_pages.size:
            refs = np.isin(table.phys, shared_pages).reshape(shape)
            outside = refs & (column >= np.maximum(cols.shared, cols.cached)[None, :, None, None])
            if outside.any():
                problems.append("pages with several references outside the shared columns of slots %s"
                                % np.flatnonzero(outside.any(axis=(0, 2, 3))).tolist())
        problems += self._check_prefix(shape, column)
        s = self.stats()
        if s.used_pages + s.reclaimable_pages + s.free_pages != s.total_pages or s.mapped_pages != table.num_used:
            problems.append("used %d + reclaimable %d + free %d != %d pages, or mapped %d != page table %d"
                            % (s.used_pages, s.reclaimable_pages, s.free_pages, s.total_pages, s.mapped_pages,
                               table.num_used))
        if problems:
            raise VmemIntegrityError("; ".join(problems))

    @synchronized
    def close(self) -> None:
        """Wait for the worker, unmap everything and release the reservation and the pool."""
        if self._closed:
            return
        try:
            self._settle()
        finally:
            self._closed = True
            if self._prefetcher is not None:
                self._prefetcher.close()
            try:
                synchronize_for_unmap(self.device)   # releasing unmaps every page: no kernel may still read one
            finally:
                self._planes = []
                self._reservation.close()
                self._pool.close()                # gives the budget its pages back
                if self._own_lease:
                    self._lease.close()


def _open_backend(backend, device):
    from vmem.backends import Backend, get_backend
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str):
        raise VmemInvalidArgument("backend must be 'auto', 'host', 'cuda' or a Backend, got %r" % (backend,))
    return get_backend(backend) if device is None else get_backend(backend, device=_device_index(device))


def _device_index(device) -> int:
    if isinstance(device, int):
        return device
    device = torch.device(device)
    return device.index or 0
