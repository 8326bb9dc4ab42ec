"""Arithmetic token slots over vmem's VirtualKVCache: the SGLang plugin's logic, without SGLang.

Token slot ids are arithmetic instead of taken from a free list:

    token id  =  slot * row_tokens + pos          pos in [0, row_tokens), slot in [0, num_slots)
    k_buffer[l] = VirtualKVCache.kv(l)[0].view(-1, H, D)     [num_slots * row_tokens, H, D]

so the tokens a request computes sit in one contiguous virtual row, its *writer slot*, at their own
positions, and SGLang's ``req_to_token[r, p]`` records ``slot * row_tokens + p``. Slot 0 is SGLang's
padding row: token 0 absorbs the dummy writes of padded (CUDA-graph) batches, so its first page stays
mapped. ``row_tokens`` is ``max_context_len`` rounded up so rows start on vmem pages and on SGLang pages
(``page_size``); an SGLang page must cover whole vmem pages.

The radix (prefix) cache shares token ids: a request that matched a cached prefix reads the prefix from
the slot that computed it, and the tree keeps a finished request's ids after the request is gone. So a
slot lives while anything holds its tokens: ``_held[slot]`` marks the SGLang pages allocated and not yet
freed (by the request, or by the tree when it evicts), and the request row writing it (``_slot_of_row``)
until SGLang gives the row back (``rows_released``, called from ReqToTokenPool.free_rows). A slot with
neither is freed to the cache (its pages stay mapped for reuse until reclaimed: deferred reclamation); a
slot only the tree holds keeps its length at its last held page, so evicted tail pages become
reclaimable at once. A new request whose cached prefix ends a slot nobody writes any more continues in
that slot right after the prefix (one contiguous row again, no pages mapped twice); otherwise it gets a
fresh slot, whose positions before its prefix are mapped but unused (that request costs the memory it
would without the radix cache; its compute is still saved).

::

    slot 3 (tree):    | prefix p0 p1 p2 (held by the tree) | request B continues: p3 p4 ...
    slot 5 (fresh):   | unused p0 p1 p2                    | request C (its prefix read from slot 3)

``alloc_extend`` / ``alloc_decode`` map what the new tokens need (one native call, atomic: on
VmemOutOfMemory nothing changes and they return None, which SGLang reports as out of memory); ``free``
releases pages. ``available_size`` counts free and reclaimable pages, and reports 0 when every slot is
taken while the tree holds some, so SGLang evicts from the tree (cache slots: rows + ``extra_slots``).

Without ``rows_released`` wired (tests of the plugin logic; the radix cache off), freeing position 0 of a
row ends the row's writing, as SGLang frees a finished request's whole row then. ``alloc(n)`` without
request context (page_size 1) is refused.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from vmem.allocator import KVCacheSpec, VirtualKVCache
from vmem.errors import VmemIntegrityError, VmemInvalidArgument, VmemOutOfMemory

logger = logging.getLogger(__name__)

_FP8 = tuple(d for d in (getattr(torch, "float8_e5m2", None), getattr(torch, "float8_e4m3fn", None)) if d)


def store_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """What SGLang stores: fp8 caches as uint8 bytes."""
    return torch.uint8 if dtype in _FP8 else dtype


def row_geometry(head_num: int, head_dim: int, store_dtype: torch.dtype, max_context_len: int, page_size: int,
                 page_bytes: int) -> int:
    """Tokens per request row: max_context_len rounded up to whole vmem pages and SGLang pages."""
    token_bytes = head_num * head_dim * store_dtype.itemsize        # one token of one K (or V) plane
    if (page_size * token_bytes) % page_bytes:
        raise VmemInvalidArgument(
            "an SGLang page of %d tokens is %d bytes per layer, not a whole number of %d-byte vmem pages: use "
            "--page-size %d (or a multiple)" % (page_size, page_size * token_bytes, page_bytes,
                                                  page_bytes // math.gcd(page_bytes, token_bytes)))
    quantum = page_bytes // math.gcd(page_bytes, token_bytes)
    quantum = quantum * page_size // math.gcd(quantum, page_size)
    return -(-max_context_len // quantum) * quantum


def make_cache(*, num_rows: int, max_context_len: int, page_size: int, num_tokens: int, head_num: int,
               head_dim: int, layer_num: int, dtype: torch.dtype, backend, page_bytes: int | None = None,
               reclaim: str = "deferred", extra_slots: int | None = None) -> tuple[VirtualKVCache, int]:
    """The VirtualKVCache behind an SGLang pool and its row length in tokens.

    ``num_rows + 1 + extra_slots`` slots (slot 0: the padding row, first page mapped; the extra ones hold
    rows the radix tree keeps after their request; default ``num_rows``: virtual address space only); the
    pool holds ``num_tokens`` tokens of every layer (rounded up to pages) plus the padding page.
    ``backend``: a vmem Backend.
    """
    store = store_dtype_of(dtype)
    page_bytes = int(page_bytes or backend.granularity_bytes)
    row_tokens = row_geometry(head_num, head_dim, store, max_context_len, page_size, page_bytes)
    spec = KVCacheSpec(num_layers=layer_num, num_kv_heads=head_num, head_dim=head_dim, dtype=store,
                       max_batch=num_rows + 1 + (num_rows if extra_slots is None else int(extra_slots)),
                       max_seq_len=row_tokens, page_bytes=page_bytes, layout="NHD")
    columns = -(-num_tokens // int(spec.tokens_per_page)) + 1
    cache = VirtualKVCache(spec, memory_bytes=columns * spec.rows_per_slot * page_bytes, backend=backend,
                           reclaim=reclaim)
    padding = cache.alloc_slot()
    if padding != 0:
        cache.close()
        raise VmemInvalidArgument("the padding row must be slot 0, got %d" % padding)
    cache.step({0: page_size})                      # token 0 absorbs padded (CUDA-graph) writes
    return cache, row_tokens


class TokenSlots:
    """Request rows (SGLang's req_pool_idx) -> writer slots, held SGLang pages per slot, and token ids
    ``slot * row_tokens + pos``.

    Invariants (``check_integrity()``): every request row maps to one live cache slot and back; every slot
    with held pages is live and its length covers them; every other live slot but the padding row 0 has
    a writer; the cache's own invariants hold.
    """

    def __init__(self, cache: VirtualKVCache, row_tokens: int, page_size: int = 1):
        self.cache = cache
        self.row_tokens = int(row_tokens)
        self.page_size = int(page_size)
        if self.page_size < 1 or self.row_tokens % self.page_size:
            raise VmemInvalidArgument("row_tokens %d is not a whole number of %d-token pages"
                                      % (self.row_tokens, self.page_size))
        self.track_rows = False            # True once rows_released is wired (the plugin does it)
        self._slot_of_row: dict[int, int] = {}
        self._row_of_slot: dict[int, int] = {}
        self._held: dict[int, np.ndarray] = {}     # slot -> [row_tokens // page_size] bool

    def slot_of_row(self, row: int) -> int | None:
        return self._slot_of_row.get(row)

    def held_pages(self, slot: int) -> int:
        """SGLang pages of ``slot`` allocated and not yet freed (by a request or the radix tree)."""
        held = self._held.get(int(slot))
        return 0 if held is None else int(held.sum())

    def row_of_token(self, token_id: int) -> int:
        slot = int(token_id) // self.row_tokens
        if slot not in self._row_of_slot:
            raise VmemInvalidArgument("token id %d is in slot %d, which no request writes" % (token_id, slot))
        return self._row_of_slot[slot]

    def available_tokens(self) -> int:
        if not self.cache.num_free_slots and any(s not in self._row_of_slot for s in self._held):
            return 0                        # every slot taken, some only by the tree: let SGLang evict
        s = self.cache.stats()
        return (s.free_pages + s.reclaimable_pages) // self.cache.spec.rows_per_slot * int(
            self.cache.spec.tokens_per_page)

    # ---- placement ---------------------------------------------------------------------------
    def _continuable(self, prefix: int, last_loc: int | None) -> int | None:
        """The slot a new request with this cached prefix may continue: the prefix ends there at its own
        position, on a page boundary, nothing after it is held and nobody writes the slot."""
        if not prefix or last_loc is None or prefix % self.page_size or last_loc < 0:
            return None
        slot, pos = divmod(int(last_loc), self.row_tokens)
        held = self._held.get(slot)
        if pos != prefix - 1 or slot in self._row_of_slot or held is None or held[prefix // self.page_size:].any():
            return None
        return slot

    def _slots_for(self, rows, prefix, last_locs) -> tuple[list[int], list[int], list[int]]:
        """Writer slots of rows; (slots, fresh slots taken, existing slots that got a writer)."""
        slots, fresh, adopted = [], [], []
        for i, row in enumerate(rows):
            slot = self._slot_of_row.get(row)
            if slot is None:
                slot = self._continuable(prefix[i], last_locs[i] if last_locs is not None else None)
                if slot is not None and slot not in adopted:
                    adopted.append(slot)
                else:
                    slot = self.cache.alloc_slot()
                    fresh.append(slot)
                self._slot_of_row[row], self._row_of_slot[slot] = slot, row
            slots.append(slot)
        return slots, fresh, adopted

    def _undo_writers(self, slots: list[int]) -> None:
        for slot in slots:
            del self._slot_of_row[self._row_of_slot.pop(slot)]
            if slot not in self._held:
                self.cache.free_slot(slot)

    def _step(self, slots: list[int], seq_lens: list[int], undo: list[int]) -> bool:
        needs: dict[int, int] = {}
        for slot, n in zip(slots, seq_lens):
            needs[slot] = max(needs.get(slot, 0), int(n), self.cache.length(slot))
        try:
            self.cache.step(needs)
        except VmemOutOfMemory as exc:
            logger.debug("vmem: allocation refused (%s)", exc)
            self._undo_writers(undo)
            return False
        return True

    def _hold(self, slot: int, first: int, end: int) -> None:
        """Positions [first, end) of slot are allocated: their pages are held."""
        held = self._held.get(slot)
        if held is None:
            held = self._held[slot] = np.zeros(self.row_tokens // self.page_size, dtype=bool)
        if end > first:
            held[first // self.page_size: -(-end // self.page_size)] = True

    def extend(self, rows, prefix_lens, seq_lens, last_locs=None) -> np.ndarray | None:
        """Ids of positions [prefix_lens[i], seq_lens[i]) of request rows[i], concatenated ([n] int64);
        None (and nothing changed) if memory cannot hold them. ``last_locs[i]``: the id of position
        prefix_lens[i] - 1 (the cached prefix's last token), -1 or None when there is none."""
        rows, prefix, seq = [int(r) for r in rows], [int(p) for p in prefix_lens], [int(s) for s in seq_lens]
        if last_locs is not None:
            last_locs = [int(x) for x in last_locs]
        if any(not 0 <= p <= s <= self.row_tokens for p, s in zip(prefix, seq)):
            raise VmemInvalidArgument("extend lengths outside [0, %d]: prefix %s, seq %s"
                                      % (self.row_tokens, prefix, seq))
        slots, fresh, adopted = self._slots_for(rows, prefix, last_locs)
        if not self._step(slots, seq, fresh + adopted):
            return None
        for slot, p, s in zip(slots, prefix, seq):
            self._hold(slot, p, s)
        if not slots:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([slot * self.row_tokens + np.arange(p, s, dtype=np.int64)
                               for slot, p, s in zip(slots, prefix, seq)])

    def decode(self, last_locs, seq_lens, rows=None) -> np.ndarray | None:
        """Id of position seq_lens[i] - 1 of request rows[i] (its writer slot); without rows, of the request
        writing the slot of its previous token last_locs[i] (right only while no prefix is shared)."""
        if rows is None:
            rows = [self.row_of_token(loc) for loc in last_locs]
        rows = [int(r) for r in rows]
        if any(r not in self._slot_of_row for r in rows):
            raise VmemInvalidArgument("decode of request rows %s, which write no slot"
                                      % sorted(r for r in rows if r not in self._slot_of_row))
        slots = [self._slot_of_row[r] for r in rows]
        seq = [int(s) for s in seq_lens]
        if any(not 1 <= s <= self.row_tokens for s in seq):
            raise VmemInvalidArgument("decode lengths outside [1, %d]: %s" % (self.row_tokens, seq))
        if not self._step(slots, seq, []):
            return None
        for slot, s in zip(slots, seq):
            self._hold(slot, s - 1, s)
        return np.asarray(slots, dtype=np.int64) * self.row_tokens + np.asarray(seq, dtype=np.int64) - 1

    # ---- release -----------------------------------------------------------------------------
    def free(self, token_ids: np.ndarray) -> list[int]:
        """Tokens come back (a request's, or the tree's on eviction): the SGLang pages holding them are
        released, as SGLang's paged allocator releases whole pages. Returns the rows whose writing ended
        (only without rows_released: freeing position 0 ends it)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.cache.num_slots * self.row_tokens):
            raise VmemInvalidArgument("free of token ids outside [0, %d)" % (self.cache.num_slots * self.row_tokens))
        pages = np.unique(ids // self.page_size)
        slots, idx = np.divmod(pages, self.row_tokens // self.page_size)
        for slot in np.unique(slots).tolist():
            held = self._held.get(slot)
            if held is None or not held[idx[slots == slot]].all():
                raise VmemInvalidArgument("free of token ids of slot %d that are not allocated" % slot)
        ended = []
        for slot in np.unique(slots).tolist():
            self._held[slot][idx[slots == slot]] = False
            if not self.track_rows and slot in self._row_of_slot and 0 in idx[slots == slot]:
                ended.append(self._row_of_slot[slot])
                self._end_writer(slot)
            else:
                self._settle(slot)
        return ended

    def rows_released(self, rows) -> None:
        """SGLang gave request rows back (ReqToTokenPool.free_rows): their writing ended; what the tree
        still holds in their slots stays."""
        for row in rows:
            slot = self._slot_of_row.get(int(row))
            if slot is not None:
                self._end_writer(slot)

    def _end_writer(self, slot: int) -> None:
        del self._slot_of_row[self._row_of_slot.pop(slot)]
        self._settle(slot)

    def _settle(self, slot: int) -> None:
        """A slot without a writer: freed when nothing is held, else cut back to its last held page."""
        if slot in self._row_of_slot:
            return
        held = self._held.get(slot)
        if held is None or not held.any():
            self._held.pop(slot, None)
            self.cache.free_slot(slot)
            return
        end = (int(np.flatnonzero(held)[-1]) + 1) * self.page_size
        if end < self.cache.length(slot):
            self.cache.step({slot: end})

    def release(self, slot: int) -> None:
        """Forget everything of slot (its writer and held pages) and free it."""
        row = self._row_of_slot.pop(slot, None)
        if row is not None:
            del self._slot_of_row[row]
        self._held.pop(slot, None)
        self.cache.free_slot(slot)

    def clear(self) -> None:
        for slot in set(self._row_of_slot) | set(self._held):
            self.release(slot)

    def check_integrity(self) -> None:
        live = set(self.cache.live_slots)
        want = set(self._row_of_slot) | set(self._held) | {0}
        if live != want:
            raise VmemIntegrityError("live cache slots %s != written or held slots %s + padding"
                                     % (sorted(live), sorted(want - {0})))
        if any(self._slot_of_row.get(r) != s for s, r in self._row_of_slot.items()) or \
                len(self._slot_of_row) != len(self._row_of_slot):
            raise VmemIntegrityError("row <-> slot maps disagree")
        for slot, held in self._held.items():
            if held.any() and int(np.flatnonzero(held)[-1]) * self.page_size >= self.cache.length(slot):
                raise VmemIntegrityError("slot %d holds pages beyond its length %d" % (slot, self.cache.length(slot)))
            if not held.any() and slot not in self._row_of_slot:
                raise VmemIntegrityError("slot %d is kept with nothing held and no writer" % slot)
        self.cache.check_integrity()
