"""KVCacheManager: the protocol engines and benchmarks code against, and the slot bookkeeping
the three managers (vmem, paged, static) share.

What each call may do (plan vs run, in FlashInfer's sense):
  * pure, safe inside a CUDA graph: ``kv()``, ``spec``, ``stats()``, ``pages_needed()``, ``can_allocate()``;
  * may talk to the OS/driver (map, unmap, grow, trim): ``step()``, ``prefetch()``, ``free_slot()`` (eager
    reclamation), ``reclaim_idle()``, ``close()``;
  * ``attention()`` writes K/V in place and runs a kernel; it never maps.

Threads: every public method runs under the manager's one lock (``synchronized`` / ``transaction``),
so managers may be shared by threads; the native layer below is thread-safe on its own. ``kv()`` and
the kernel of ``attention()`` take no lock (views; the caller orders its writes after step()).

Interrupts: a ``transaction`` method (one that changes slots or pages) hit by an exception that is not
one of vmem's own typed errors (a KeyboardInterrupt at any line, a bug) calls ``_recover()`` before the
exception propagates, so the invariants hold again (VirtualKVCache: the page table is re-read from the
backend); vmem's typed errors are handled where they are raised and leave a consistent state there.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from vmem.allocator.spec import KVCacheSpec
from vmem.allocator.stats import CacheStats, new_counters, new_peaks
from vmem.errors import VmemClosedError, VmemError, VmemInvalidArgument, VmemSlotError

_DEBUG = bool(os.environ.get("VMEM_DEBUG"))


def check_memory_bytes(memory_bytes) -> int | None:
    """The one check of a manager's ``memory_bytes``: None (no bound) or a positive int."""
    if memory_bytes is not None and (isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int)
                                     or memory_bytes <= 0):
        raise VmemInvalidArgument("memory_bytes must be a positive int, got %r" % (memory_bytes,))
    return memory_bytes


def synchronized(method):
    """Run ``method`` under its manager's lock (an RLock: public methods call each other)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return call


def transaction(method):
    """``synchronized``, and an exception other than a VmemError leaves the outermost call only after
    ``self._recover()`` made the state consistent again (module docstring: Interrupts)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            if self._in_transaction:             # nested (step inside ensure...): the outer call recovers
                return method(self, *args, **kwargs)
            try:                                  # the flag is set inside the try, so it is always reset
                self._in_transaction = True
                return method(self, *args, **kwargs)
            except VmemError:
                raise
            except BaseException:
                if not self._closed:
                    self._recover()
                raise
            finally:
                self._in_transaction = False
    return call


@runtime_checkable
class KVCacheManager(Protocol):
    kind: str
    spec: KVCacheSpec
    device: torch.device

    def alloc_slot(self, num_tokens: int | None = None, token_ids: Sequence[int] | None = None) -> int: ...
    def num_cached_tokens(self, slot: int) -> int: ...
    def cache_prefix(self, slot: int, token_ids: Sequence[int]) -> int: ...
    def match_prefix(self, token_ids: Sequence[int]) -> int: ...
    def maintain(self, *, force: bool = False) -> int: ...
    def budget_short(self, needs: Mapping[int, int]) -> bool: ...
    def budget_reclaimable_elsewhere(self) -> int: ...
    def free_slot(self, slot: int) -> None: ...
    @property
    def num_free_slots(self) -> int: ...
    def pages_needed(self, needs: Mapping[int, int]) -> int: ...
    def can_allocate(self, needs: Mapping[int, int]) -> bool: ...
    def step(self, needs: Mapping[int, int]) -> None: ...
    def ensure(self, slot: int, num_tokens: int) -> None: ...
    def prefetch(self, needs: Mapping[int, int]) -> None: ...
    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def attention(self, layer, q, k, v, cache_seqlens, slots, causal=True, softmax_scale=None) -> torch.Tensor: ...
    def stats(self) -> CacheStats: ...
    def check_integrity(self) -> None: ...
    def close(self) -> None: ...


class SlotCache:
    """Slot bookkeeping: which slots are live and how many tokens each holds.

    Invariants: ``lengths[s] == 0`` for every free slot; ``0 <= lengths[s] <= spec.max_seq_len``.
    """

    kind = "base"
    prefix_caching = False

    def __init__(self, spec: KVCacheSpec, num_slots: int, device):
        if not isinstance(spec, KVCacheSpec):
            raise VmemInvalidArgument("spec must be a KVCacheSpec, got %r" % (type(spec).__name__,))
        self.spec = spec
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_slots = int(num_slots)
        self._live = np.zeros(self.num_slots, dtype=bool)
        self._lengths = np.zeros(self.num_slots, dtype=np.int64)
        self._cached_tokens = np.zeros(self.num_slots, dtype=np.int64)   # leading tokens held by a prefix cache
        self._counters = new_counters()
        self._peaks = new_peaks()
        self._closed = False
        self._lock = threading.RLock()
        self._in_transaction = False

    # ---- validation -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise VmemClosedError("this %s cache is closed" % self.kind)

    def _check_slot(self, slot) -> int:
        self._check_open()
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)):
            raise VmemInvalidArgument("a slot must be an int, got %r" % (slot,))
        if not 0 <= slot < self.num_slots:
            raise VmemSlotError("slot %d does not exist (this cache has %d)" % (slot, self.num_slots))
        if not self._live[slot]:
            raise VmemSlotError("slot %d is not allocated (never allocated or already freed)" % slot)
        return int(slot)

    def _parse_needs(self, needs: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """needs: {slot: total tokens} -> (slots [n] int64, tokens [n] int64), validated, sorted by slot."""
        self._check_open()
        if type(needs) is not dict and not isinstance(needs, Mapping):
            raise VmemInvalidArgument("needs must be a mapping {slot: num_tokens}, got %r" % (type(needs).__name__,))
        keys, values = list(needs.keys()), list(needs.values())
        if all(type(x) is int for x in keys) and all(type(x) is int for x in values):
            try:
                slots = np.array(keys, dtype=np.int64)
                tokens = np.array(values, dtype=np.int64)
            except OverflowError:              # beyond int64: the slow path names the bad entry
                slots = tokens = None
            if slots is not None and not slots.size:
                return slots, tokens
            if (slots is not None and slots.min() >= 0 and slots.max() < self.num_slots and self._live[slots].all()
                    and tokens.min() >= 0 and tokens.max() <= self.spec.max_seq_len):
                order = np.argsort(slots, kind="stable")
                return slots[order], tokens[order]
        # slow path: find the offending entry and raise its typed error
        items = sorted((self._check_slot(s), self.spec.check_num_tokens(n)) for s, n in needs.items())
        slots = np.fromiter((s for s, _ in items), dtype=np.int64, count=len(items))
        tokens = np.fromiter((n for _, n in items), dtype=np.int64, count=len(items))
        return slots, tokens

    # ---- slots ----------------------------------------------------------------------------
    @property
    @synchronized
    def num_free_slots(self) -> int:
        self._check_open()
        return int(self.num_slots - np.count_nonzero(self._live))

    @property
    @synchronized
    def live_slots(self) -> list[int]:
        return np.flatnonzero(self._live).tolist()

    @synchronized
    def length(self, slot: int) -> int:
        """Tokens the last step() made room for in a live slot."""
        return int(self._lengths[self._check_slot(slot)])

    @transaction
    def alloc_slot(self, num_tokens: int | None = None, token_ids: Sequence[int] | None = None) -> int:
        """A free slot for a new request (length 0). ``num_tokens`` optionally hints how long it may grow
        (advisory: clamped to [0, max_seq_len]). ``token_ids``: the request's prompt; a cache with prefix
        caching attaches the longest cached prefix of it to the slot (``num_cached_tokens(slot)`` says how
        many tokens; the next step() maps them), and vmem prefers the free slot still mapping it.

        Raises VmemSlotError when all slots are live.
        """
        self._check_open()
        if num_tokens is not None:
            if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)):
                raise VmemInvalidArgument("num_tokens hint must be an int, got %r" % (num_tokens,))
            num_tokens = min(max(int(num_tokens), 0), self.spec.max_seq_len)
        if token_ids is not None:
            token_ids = self._check_token_ids(token_ids)
        free = np.flatnonzero(~self._live)
        if free.size == 0:
            raise VmemSlotError("all %d slots are in use" % self.num_slots)
        slot = self._choose_slot(free, num_tokens)
        self._live[slot] = True
        self._lengths[slot] = 0
        self._peaks["live_slots"] = max(self._peaks["live_slots"], int(np.count_nonzero(self._live)))
        if token_ids is not None and self.prefix_caching:
            self._cached_tokens[slot] = self._attach_prefix(slot, token_ids)
        return slot

    def _check_token_ids(self, token_ids) -> list[int]:
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, (Sequence, np.ndarray)):
            raise VmemInvalidArgument("token_ids must be a sequence of ints, got %r" % (type(token_ids).__name__,))
        ids = list(token_ids)
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
            raise VmemInvalidArgument("token_ids must hold ints")
        if len(ids) > self.spec.max_seq_len:
            raise VmemInvalidArgument("%d token ids exceed max_seq_len %d" % (len(ids), self.spec.max_seq_len))
        return [int(t) for t in ids]

    @synchronized
    def num_cached_tokens(self, slot: int) -> int:
        """Leading tokens of a live slot whose K/V a prefix cache supplies (attached at alloc_slot, or
        entered by cache_prefix): the request never writes them."""
        return int(self._cached_tokens[self._check_slot(slot)])

    @synchronized
    def match_prefix(self, token_ids: Sequence[int]) -> int:
        """Tokens of ``token_ids`` a new request would find cached (whole pages; at most all but the last
        token, which must be computed to sample). Pure. 0 without prefix caching."""
        self._check_open()
        self._check_token_ids(token_ids)
        return 0

    @transaction
    def cache_prefix(self, slot: int, token_ids: Sequence[int]) -> int:
        """``token_ids`` are the tokens whose K/V the live ``slot`` holds from position 0: their full pages
        enter the prefix index (no native call). Returns the slot's cached tokens. No-op without caching."""
        self._check_open()
        self._check_slot(slot)
        self._check_token_ids(token_ids)
        return int(self._cached_tokens[slot])

    def _attach_prefix(self, slot: int, token_ids: list[int]) -> int:
        return 0

    # A cache without a shared budget (every baseline; a VirtualKVCache without budget= answers the same
    # through ElasticPages): nothing to give back, never short of a budget.
    def maintain(self, *, force: bool = False) -> int:
        return 0

    def budget_short(self, needs: Mapping[int, int]) -> bool:
        return False

    def budget_reclaimable_elsewhere(self) -> int:
        return 0

    def _choose_slot(self, free: np.ndarray, num_tokens: int | None) -> int:
        return int(free[0])

    @transaction
    def free_slot(self, slot: int) -> None:
        """The request in ``slot`` finished or was preempted; its length is forgotten."""
        self._check_open()
        slot = self._check_slot(slot)
        # the slot is free before its pages go (an interrupt in between leaves a free slot holding pages)
        self._lengths[slot] = 0
        self._cached_tokens[slot] = 0
        self._live[slot] = False
        self._release_slot(slot)

    def _release_slot(self, slot: int) -> None:
        pass

    def _record_lengths(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        self._lengths[slots] = tokens
        live_tokens = int(self._lengths.sum())
        self._peaks["live_tokens"] = max(self._peaks["live_tokens"], live_tokens)

    # ---- defaults -------------------------------------------------------------------------
    @synchronized
    def can_allocate(self, needs: Mapping[int, int]) -> bool:
        """Whether step(needs) would succeed now (no side effects)."""
        return self.pages_needed(needs) <= self._available_pages()

    def _available_pages(self) -> int:
        raise NotImplementedError

    @transaction
    def ensure(self, slot: int, num_tokens: int) -> None:
        """step() for one slot: make tokens [0, num_tokens) of ``slot`` writable."""
        self.step({slot: num_tokens})

    @synchronized
    def prefetch(self, needs: Mapping[int, int]) -> None:
        """Begin mapping what the next step needs; the baselines have nothing to map."""
        self._parse_needs(needs)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @synchronized
    def _check_attention_args(self, q, cache_seqlens, slots) -> None:
        """Typed errors for bad shapes; on CPU (or with VMEM_DEBUG set) also that every slot is live and
        step() made room for cache_seqlens + seqlen tokens: a write past the mapped part of a virtual
        tensor would fault. On CUDA that check would synchronise the device every layer."""
        self._check_open()
        for name, t in (("q", q), ("cache_seqlens", cache_seqlens), ("slots", slots)):
            if not isinstance(t, torch.Tensor):
                raise VmemInvalidArgument("attention: %s must be a torch tensor, got %s" % (name, type(t).__name__))
        if q.dim() != 4:
            raise VmemInvalidArgument("q must be [batch, seqlen, num_heads, head_dim], got shape %s" % (tuple(q.shape),))
        batch, new_tokens = q.shape[0], q.shape[1]
        if tuple(cache_seqlens.shape) != (batch,) or tuple(slots.shape) != (batch,):
            raise VmemInvalidArgument("cache_seqlens and slots must be [batch=%d] tensors" % batch)
        if cache_seqlens.device.type != "cpu" and not _DEBUG:
            return
        idx = slots.detach().cpu().numpy().astype(np.int64)
        ends = cache_seqlens.detach().cpu().numpy().astype(np.int64) + new_tokens
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_slots or not self._live[idx].all()):
            for s in idx:
                self._check_slot(int(s))
        starts = ends - new_tokens
        if np.any(starts < self._cached_tokens[idx]):
            bad = int(np.flatnonzero(starts < self._cached_tokens[idx])[0])
            raise VmemInvalidArgument("slot %d: writing from token %d would overwrite its first %d tokens, which "
                                      "a prefix cache holds" % (idx[bad], starts[bad], self._cached_tokens[idx[bad]]))
        if np.any(ends > self._lengths[idx]):
            bad = int(np.flatnonzero(ends > self._lengths[idx])[0])
            raise VmemInvalidArgument(
                "slot %d: attention over %d tokens but step() made room for %d; call step() first"
                % (idx[bad], ends[bad], self._lengths[idx[bad]]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @synchronized
    def close(self) -> None:
        self._closed = True

    def _recover(self) -> None:
        """Make the state consistent after an interrupted transaction (see the module docstring). Slot
        bookkeeping changes in single assignments whose every order is consistent: nothing to do here."""

    @property
    def closed(self) -> bool:
        return self._closed

    def _note_used(self, used_pages: int) -> None:
        if used_pages > self._peaks["used_pages"]:
            self._peaks["used_pages"] = used_pages

    def _stats(self, *, page_bytes: int, total_pages: int, used_pages: int, reclaimable_pages: int,
               os_mappings: int = 0) -> CacheStats:
        self._peaks["used_pages"] = max(self._peaks["used_pages"], used_pages)
        return CacheStats.build(
            kind=self.kind, page_bytes=page_bytes, total_pages=total_pages, used_pages=used_pages,
            reclaimable_pages=reclaimable_pages, live_slots=int(np.count_nonzero(self._live)),
            live_tokens=int(self._lengths.sum()), token_bytes=self.spec.token_bytes, counters=self._counters,
            os_mappings=os_mappings, peaks=self._peaks)
