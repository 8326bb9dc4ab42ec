"""Arithmetic token slots over vmem's VirtualKVCache: the SGLang plugin's logic, without SGLang.

Token slot ids are arithmetic instead of taken from a free list:

    token id  =  slot * row_tokens + pos          pos in [0, row_tokens), slot in [0, num_rows]
    k_buffer[l] = VirtualKVCache.kv(l)[0].view(-1, H, D)     [(num_rows + 1) * row_tokens, H, D]

so request ``r``'s K/V is one contiguous virtual row, and SGLang's own ``req_to_token[r, p]`` simply
records ``slot(r) * row_tokens + p``. ``slot(r)`` is the cache's slot for SGLang's request row ``r``
(``req_pool_idx``), taken on the request's first extend and given back when its tokens are freed.
Slot 0 is SGLang's padding row: token 0 absorbs the dummy writes of padded (CUDA-graph) batches, so its
first page stays mapped. ``row_tokens`` is ``max_context_len`` rounded up so rows start on vmem pages
and on SGLang pages (``page_size``); an SGLang page must cover whole vmem pages.

``alloc_extend`` / ``alloc_decode`` map what the new tokens need (one native call, atomic: on
VmemOutOfMemory nothing changes and they return None, which SGLang reports as out of memory); ``free``
of a request's tokens gives its slot back, whose pages stay mapped for the next request there
(deferred reclamation) until the pool runs dry. ``available_size`` counts free and reclaimable pages.

Limitations: the radix (prefix) cache shares token ids between requests; with per-request rows it must
be off (``--disable-radix-cache``). ``alloc(n)`` without request context (page_size 1) is refused.
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
               reclaim: str = "deferred") -> tuple[VirtualKVCache, int]:
    """The VirtualKVCache behind an SGLang pool and its row length in tokens.

    ``num_rows + 1`` slots (slot 0: the padding row, first page mapped); the pool holds ``num_tokens``
    tokens of every layer (rounded up to pages) plus the padding page. ``backend``: a vmem Backend.
    """
    store = store_dtype_of(dtype)
    page_bytes = int(page_bytes or backend.granularity_bytes)
    row_tokens = row_geometry(head_num, head_dim, store, max_context_len, page_size, page_bytes)
    spec = KVCacheSpec(num_layers=layer_num, num_kv_heads=head_num, head_dim=head_dim, dtype=store,
                       max_batch=num_rows + 1, max_seq_len=row_tokens, page_bytes=page_bytes, layout="NHD")
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
    """Request rows (SGLang's req_pool_idx) -> cache slots, and token ids ``slot * row_tokens + pos``.

    Invariants (``check_integrity()``): every request row maps to one live cache slot and back; slot 0
    is the padding row; the cache's own invariants hold.
    """

    def __init__(self, cache: VirtualKVCache, row_tokens: int):
        self.cache = cache
        self.row_tokens = int(row_tokens)
        self._slot_of_row: dict[int, int] = {}
        self._row_of_slot: dict[int, int] = {}

    def slot_of_row(self, row: int) -> int | None:
        return self._slot_of_row.get(row)

    def row_of_token(self, token_id: int) -> int:
        slot = int(token_id) // self.row_tokens
        if slot not in self._row_of_slot:
            raise VmemInvalidArgument("token id %d is in slot %d, which no request holds" % (token_id, slot))
        return self._row_of_slot[slot]

    def available_tokens(self) -> int:
        s = self.cache.stats()
        return (s.free_pages + s.reclaimable_pages) // self.cache.spec.rows_per_slot * int(
            self.cache.spec.tokens_per_page)

    def _slots_for(self, rows: list[int]) -> tuple[list[int], list[int]]:
        slots, fresh = [], []
        for row in rows:
            slot = self._slot_of_row.get(row)
            if slot is None:
                slot = self.cache.alloc_slot()
                self._slot_of_row[row], self._row_of_slot[slot] = slot, row
                fresh.append(slot)
            slots.append(slot)
        return slots, fresh

    def _step(self, slots: list[int], seq_lens: list[int], fresh: list[int]) -> bool:
        needs: dict[int, int] = {}
        for slot, n in zip(slots, seq_lens):
            needs[slot] = max(needs.get(slot, 0), int(n), self.cache.length(slot))
        try:
            self.cache.step(needs)
        except VmemOutOfMemory as exc:
            logger.debug("vmem: allocation refused (%s)", exc)
            for slot in fresh:
                self.release(slot)
            return False
        return True

    def extend(self, rows, prefix_lens, seq_lens) -> np.ndarray | None:
        """Ids of positions [prefix_lens[i], seq_lens[i]) of request rows[i], concatenated ([n] int64);
        None (and nothing changed) if memory cannot hold them."""
        rows, prefix, seq = [int(r) for r in rows], [int(p) for p in prefix_lens], [int(s) for s in seq_lens]
        if any(not 0 <= p <= s <= self.row_tokens for p, s in zip(prefix, seq)):
            raise VmemInvalidArgument("extend lengths outside [0, %d]: prefix %s, seq %s"
                                      % (self.row_tokens, prefix, seq))
        slots, fresh = self._slots_for(rows)
        if not self._step(slots, seq, fresh):
            return None
        if not slots:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([slot * self.row_tokens + np.arange(p, s, dtype=np.int64)
                               for slot, p, s in zip(slots, prefix, seq)])

    def decode(self, last_locs, seq_lens) -> np.ndarray | None:
        """Id of position seq_lens[i] - 1 of the request whose previous token is at last_locs[i]."""
        rows = [self.row_of_token(loc) for loc in last_locs]
        slots = [self._slot_of_row[r] for r in rows]
        seq = [int(s) for s in seq_lens]
        if not self._step(slots, seq, []):
            return None
        return np.asarray(slots, dtype=np.int64) * self.row_tokens + np.asarray(seq, dtype=np.int64) - 1

    def free(self, token_ids: np.ndarray) -> list[int]:
        """A request's tokens come back. Freeing position 0 of a row releases the row's slot (its pages
        stay mapped for reuse); a tail alone keeps the slot. Returns the rows released."""
        slots, pos = np.divmod(np.asarray(token_ids, dtype=np.int64), self.row_tokens)
        released = []
        for slot in np.unique(slots[pos == 0]).tolist():
            if slot not in self._row_of_slot:
                raise VmemInvalidArgument("free of token ids of slot %d, which no request holds" % slot)
            released.append(self._row_of_slot[slot])
            self.release(slot)
        return released

    def release(self, slot: int) -> None:
        row = self._row_of_slot.pop(slot)
        del self._slot_of_row[row]
        self.cache.free_slot(slot)

    def clear(self) -> None:
        for slot in list(self._row_of_slot):
            self.release(slot)

    def check_integrity(self) -> None:
        live = set(self.cache.live_slots)
        if live != set(self._row_of_slot) | {0}:
            raise VmemIntegrityError("live cache slots %s != request slots %s + padding"
                                     % (sorted(live), sorted(self._row_of_slot)))
        if any(self._slot_of_row.get(r) != s for s, r in self._row_of_slot.items()):
            raise VmemIntegrityError("row <-> slot maps disagree")
        self.cache.check_integrity()
