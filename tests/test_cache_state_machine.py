"""Hypothesis state machine over VirtualKVCache on the real host backend.

Rules: alloc, grow (one slot or a batch), free, reclaim, out-of-memory, async step (prefetch + step),
prefix sharing, and native failures injected mid-step. After every rule: check_integrity() (which also compares the
page table with the backend's own table, its mapping count and the memfd's allocated blocks), and the
tokens every live request wrote still hold its values.
"""

import numpy as np
import torch
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vmem.allocator import KVCacheSpec, VirtualKVCache
from vmem.errors import VmemDriverError, VmemOutOfMemory

MAX_BATCH = 4
MAX_SEQ = 128


class CacheMachine(RuleBasedStateMachine):
    """Model: each live slot's length and the tags in its tokens: segments (start, end, tag); a request
    writes its own tag, and a shared prefix carries the tags of the request it came from."""

    @initialize(layout=st.sampled_from([("NHD", 1), ("HND", 1), ("GROUPED", 2)]),
                reclaim=st.sampled_from(["deferred", "eager"]), async_map=st.booleans(),
                pool_columns=st.integers(3, 20))
    def setup(self, layout, reclaim, async_map, pool_columns):
        self.spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                                max_batch=MAX_BATCH, max_seq_len=MAX_SEQ, page_bytes=4096, layout=layout[0],
                                layer_group_size=layout[1])
        memory = pool_columns * self.spec.rows_per_slot * self.spec.page_bytes
        self.cache = VirtualKVCache(self.spec, memory_bytes=memory, backend="host", reclaim=reclaim,
                                    async_map=async_map)
        self.lengths = {}
        self.tags = {}
        self.segments = {}
        self.next_tag = 1.0

    def teardown(self):
        if hasattr(self, "cache"):
            self.cache.close()

    # ---- helpers -------------------------------------------------------------------------
    def _views(self, slot, first, end):
        k, _ = self.cache.kv(0)
        _, v = self.cache.kv(self.spec.num_layers - 1)
        if self.spec.layout == "HND":
            return k[slot, :, first:end], v[slot, :, first:end]
        return k[slot, first:end], v[slot, first:end]

    def _step(self, needs, prefetch=False):
        """step(needs) and compare with the model; True if it mapped."""
        stats = self.cache.stats()
        needed = self.cache.pages_needed(needs)
        fits = self.cache.can_allocate(needs)
        assert needed <= stats.free_pages or not fits or stats.reclaimable_pages
        if prefetch:
            self.cache.prefetch(needs)
        try:
            self.cache.step(needs)
        except VmemOutOfMemory as exc:
            assert not fits
            assert exc.needed_pages == needed > exc.free_pages
            assert stats.free_pages <= exc.free_pages <= stats.free_pages + stats.reclaimable_pages
            after = self.cache.stats()
            assert (after.used_pages, after.live_tokens) == (stats.used_pages, stats.live_tokens)
            return False
        assert fits
        for slot, n in needs.items():
            old = self.lengths[slot]
            if n > old:
                for view in self._views(slot, old, n):
                    view.fill_(self.tags[slot])
                self.segments[slot].append((old, n, self.tags[slot]))
            self.lengths[slot] = n
        return True

    # ---- rules ---------------------------------------------------------------------------
    @precondition(lambda self: len(self.lengths) < MAX_BATCH)
    @rule(hint=st.none() | st.integers(0, MAX_SEQ))
    def alloc(self, hint):
        slot = self.cache.alloc_slot(num_tokens=hint)
        assert slot not in self.lengths
        self.lengths[slot] = 0
        self.tags[slot] = self.next_tag
        self.segments[slot] = []
        self.next_tag += 1.0

    @precondition(lambda self: self.lengths)
    @rule(data=st.data(), grow=st.integers(0, MAX_SEQ), prefetch=st.booleans())
    def grow_one(self, data, grow, prefetch):
        slot = data.draw(st.sampled_from(sorted(self.lengths)))
        self._step({slot: min(MAX_SEQ, self.lengths[slot] + grow)}, prefetch=prefetch)

    @precondition(lambda self: self.lengths)
    @rule(grow=st.integers(1, 40), prefetch=st.booleans())
    def grow_batch(self, grow, prefetch):
        """A decode/prefill step of every live request at once."""
        self._step({s: min(MAX_SEQ, n + grow) for s, n in self.lengths.items()}, prefetch=prefetch)

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def free(self, data):
        slot = data.draw(st.sampled_from(sorted(self.lengths)))
        self.cache.free_slot(slot)
        del self.lengths[slot], self.tags[slot], self.segments[slot]

    @precondition(lambda self: len(self.lengths) < MAX_BATCH and any(self.lengths.values()))
    @rule(data=st.data())
    def share(self, data):
        """A new request starts from another's prefix: its pages are mapped, not copied."""
        src = data.draw(st.sampled_from(sorted(s for s, n in self.lengths.items() if n)))
        num_tokens = data.draw(st.integers(0, self.lengths[src]))
        self.alloc(None)
        dst = max(self.tags, key=self.tags.get)
        before = self.cache.stats()
        shared = self.cache.share_prefix(src, dst, num_tokens)
        tpp = int(self.spec.tokens_per_page)
        assert shared == num_tokens // tpp * tpp
        event("prefix shared" if shared else "prefix too short to share")
        self.lengths[dst] = shared
        self.segments[dst] = [(a, min(b, shared), t) for a, b, t in self.segments[src] if a < shared]
        after = self.cache.stats()
        assert after.live_tokens == before.live_tokens + shared
        assert after.pages_mapped - before.pages_mapped == self.spec.pages_for_tokens(shared)

    @rule()
    def reclaim(self):
        idle = self.cache.stats().reclaimable_pages
        assert self.cache.reclaim_idle() == idle
        assert self.cache.stats().reclaimable_pages == 0

    @precondition(lambda self: self.lengths)
    @rule(nth=st.integers(1, 6), grow=st.integers(1, MAX_SEQ), prefetch=st.booleans())
    def native_failure(self, nth, grow, prefetch):
        """The nth OS call of the next step (or of its prefetch, on the worker) fails: the step either
        completes or changes nothing; a failed prefetch only means step() maps synchronously."""
        before = self.cache.stats()
        self.cache.reservation.inject_fault(nth)
        try:
            self._step({s: min(MAX_SEQ, n + grow) for s, n in self.lengths.items()}, prefetch=prefetch)
        except VmemDriverError:
            after = self.cache.stats()
            assert (after.used_pages, after.live_tokens, after.free_pages) == \
                (before.used_pages, before.live_tokens, before.free_pages)
        finally:
            self.cache.reservation.inject_fault(0)

    @precondition(lambda self: self.lengths)
    @rule()
    def out_of_memory(self):
        """Ask for everything: must raise (atomically) unless the pool happens to hold it."""
        self._step({s: MAX_SEQ for s in self.lengths})

    # ---- invariants ----------------------------------------------------------------------
    @invariant()
    def integrity(self):
        if not hasattr(self, "cache"):
            return
        self.cache.check_integrity()
        stats = self.cache.stats()
        assert stats.live_tokens == sum(self.lengths.values())
        # shared prefixes count once physically, so each request alone is a lower bound
        assert stats.used_pages >= max([self.spec.pages_for_tokens(n) for n in self.lengths.values()], default=0)
        assert self.cache.pool.resident_bytes() == stats.mapped_bytes

    @invariant()
    def data_survives(self):
        if not hasattr(self, "cache"):
            return
        for slot, segments in self.segments.items():
            assert sum(b - a for a, b, _ in segments) == self.lengths[slot]
            for a, b, tag in segments:
                for view in self._views(slot, a, b):
                    assert torch.all(view == tag), "slot %d lost its data in [%d, %d)" % (slot, a, b)


CacheMachine.TestCase.settings = settings(max_examples=max(200, settings.default.max_examples),
                                          stateful_step_count=40, deadline=None)
TestCacheMachine = CacheMachine.TestCase
