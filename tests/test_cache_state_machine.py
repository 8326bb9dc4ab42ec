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
        self.tpp = int(self.spec.tokens_per_page)
        rng = np.random.default_rng(0)
        p0 = rng.integers(0, 256, MAX_SEQ).tolist()
        # prompts 0 and 1 share their first page, so the index branches; 2 shares nothing
        self.prompts = [p0, p0[:self.tpp] + rng.integers(0, 256, MAX_SEQ - self.tpp).tolist(),
                        rng.integers(0, 256, MAX_SEQ).tolist()]
        self.prompt_of = {}       # slot -> prompt index: its tokens are that prompt's first lengths[slot]
        self.path_len = {}        # slot -> leading columns that are index pages
        self.shared_len = {}      # slot -> leading columns shared by share_prefix
        self.cached = {}          # tuple of a prompt's first (j + 1) * tpp tokens -> tag written in column j

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
        assert slot not in self.lengths and self.cache.num_cached_tokens(slot) == 0
        self._new(slot, prompt=int(self.next_tag) % 3)

    def _new(self, slot, prompt):
        self.lengths[slot] = 0
        self.tags[slot] = self.next_tag
        self.segments[slot] = []
        self.next_tag += 1.0
        self.prompt_of[slot] = prompt
        self.path_len[slot] = self.shared_len[slot] = 0

    def _key(self, prompt, column):
        return tuple(self.prompts[prompt][:(column + 1) * self.tpp])

    def _sync_evictions(self):
        """Drop from the model what the cache evicted; evictions never touch a live request's prefix."""
        for key in list(self.cached):
            node = self.cache._index.root
            for j in range(len(key) // self.tpp):
                node = node.children.get(key[j * self.tpp:(j + 1) * self.tpp])
                if node is None:
                    del self.cached[key]
                    break
        for slot, n in self.path_len.items():
            for j in range(n):
                assert self._key(self.prompt_of[slot], j) in self.cached, "a live request's prefix was evicted"

    @precondition(lambda self: len(self.lengths) < MAX_BATCH)
    @rule(prompt=st.integers(0, 2), num_tokens=st.sampled_from([MAX_SEQ, MAX_SEQ // 2 + 1]) | st.integers(1, MAX_SEQ))
    def alloc_prefix(self, prompt, num_tokens):
        """A request with a prompt: it gets the longest cached prefix the model predicts, mapped by one step."""
        self._sync_evictions()
        ids = self.prompts[prompt][:num_tokens]
        expected = 0
        while (expected + 1) * self.tpp <= num_tokens - 1 and self._key(prompt, expected) in self.cached:
            expected += 1
        assert self.cache.match_prefix(ids) == expected * self.tpp
        slot = self.cache.alloc_slot(num_tokens=num_tokens, token_ids=ids)
        assert slot not in self.lengths
        got = self.cache.num_cached_tokens(slot)
        assert got == expected * self.tpp
        event("prefix hit" if got else "prefix miss")
        self._new(slot, prompt)
        if got:
            calls = self.cache.stats().map_calls
            assert self.cache.pages_needed({slot: got}) == 0
            self.cache.step({slot: got})                   # maps the attached pages: no new ones
            assert self.cache.stats().map_calls - calls <= 1
            self.lengths[slot] = got
            self.path_len[slot] = expected
            self.segments[slot] = [(j * self.tpp, (j + 1) * self.tpp, self.cached[self._key(prompt, j)])
                                   for j in range(expected)]

    @precondition(lambda self: any(self.lengths.values()))
    @rule(data=st.data())
    def insert(self, data):
        """A request's computed full pages enter the index (the engine does it after prefill chunks)."""
        self._sync_evictions()
        slot = data.draw(st.sampled_from(sorted(s for s, n in self.lengths.items() if n)))
        prompt, n = self.prompt_of[slot], self.lengths[slot]
        before = self.cache.num_cached_tokens(slot)
        got = self.cache.cache_prefix(slot, self.prompts[prompt][:n])
        if self.shared_len[slot] <= self.path_len[slot]:
            j = self.path_len[slot]
            while j < n // self.tpp and self._key(prompt, j) not in self.cached:
                tags = {t for a, b, t in self.segments[slot] if a < (j + 1) * self.tpp and b > j * self.tpp}
                assert len(tags) == 1
                self.cached[self._key(prompt, j)] = tags.pop()
                j += 1
            self.path_len[slot] = j
        assert got == max(before, self.path_len[slot] * self.tpp)
        event("inserted %d columns" % (self.path_len[slot] - before // self.tpp))

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
        del self.prompt_of[slot], self.path_len[slot], self.shared_len[slot]

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
        k = shared // tpp
        self.prompt_of[dst] = self.prompt_of[src]
        self.path_len[dst] = min(k, self.path_len[src])
        self.shared_len[dst] = k
        self.shared_len[src] = max(self.shared_len[src], k)
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
    def cached_pages_keep_their_checksums(self):
        """Every index column mapped in some slot (live or idle) holds the tag it had when cached."""
        if not hasattr(self, "cache"):
            return
        self._sync_evictions()
        for node in self.cache._index.nodes():
            key, n = [], node
            while n.column >= 0:
                key[:0] = n.key
                n = n.parent
            assert tuple(key) in self.cached, "the index holds a column the model never cached"
            for slot in node.slots:
                for view in self._views(slot, node.column * self.tpp, (node.column + 1) * self.tpp):
                    assert torch.all(view == self.cached[tuple(key)]), "a cached page was overwritten"

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
