"""vmem's SGLang plugin driven through SGLang 0.5.23's real classes on a CPU-only machine (no model runs).

Run by integrations/test_env.sh (``make test-integrations``) in its own venv. Exercised for real: the
``sglang.srt.plugins`` entry point and HookRegistry, ``ReqToTokenPool``, ``MHATokenToKVPool`` (our
subclass: its ``set_kv_buffer`` / ``get_key_buffer`` run unchanged), the allocator interface as
SGLang's ``alloc_paged_token_slots_extend`` / ``alloc_paged_token_slots_decode`` / ``write_cache_indices``
call it, ``ReqToTokenPool.write`` as ``write_cache_indices`` does, ``RadixCache`` as the tree cache, off
(``disable=True``) and on (its own match_prefix / insert / evict / lock refs, as release_kv_cache's
checkpoint drives them), and the stock ``PagedTokenToKVPoolAllocator`` as the baseline the ids are
compared with. Stood in for: SGLang's Scheduler loop (requests are admitted,
grown, finished and retracted by calling what it calls, in its order).
"""

import types

import pytest

pytest.importorskip("sglang")
pytestmark = pytest.mark.integration

import torch  # noqa: E402
from sglang.srt.mem_cache import allocation  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache  # noqa: E402

from vmem.errors import VmemInvalidArgument  # noqa: E402
from vmem_sglang.pool import VmemMHATokenToKVPool, VmemTokenToKVPoolAllocator  # noqa: E402

PAGE, HEADS, HEAD_DIM, LAYERS = 16, 2, 64, 2       # a 16-token page of one K plane: 4 KiB = one host page
ROWS, CTX, TOKENS = 4, 200, 256


@pytest.fixture(scope="module", autouse=True)
def plugin():
    import sglang.srt.plugins as plugins

    plugins.load_plugins()                         # entry point -> register() -> HookRegistry.apply_hooks()
    yield


class Harness:
    """What SGLang's scheduler does around the pools, step by step, with the real functions."""

    def __init__(self, tokens=TOKENS):
        self.rtp = ReqToTokenPool(size=ROWS, max_context_len=CTX, device="cpu", enable_memory_saver=False)
        self.kv = VmemMHATokenToKVPool(tokens, page_size=PAGE, dtype=torch.float16, head_num=HEADS,
                                       head_dim=HEAD_DIM, layer_num=LAYERS, device="cpu", enable_memory_saver=False,
                                       num_rows=ROWS, max_context_len=CTX, backend="host")
        self.alloc = VmemTokenToKVPoolAllocator(tokens, PAGE, torch.float16, "cpu", self.kv)
        self.tree = RadixCache(CacheInitParams(disable=True, req_to_token_pool=self.rtp,
                                               token_to_kv_pool_allocator=self.alloc, page_size=PAGE))
        self.lens = {}                              # row -> tokens in cache

    def extend(self, rows, new_tokens):
        prefix = [self.lens.get(r, 0) for r in rows]
        seq = [p + n for p, n in zip(prefix, new_tokens)]
        last = [int(self.rtp.req_to_token[r, p - 1]) if p else -1 for r, p in zip(rows, prefix)]
        t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
        out = allocation.alloc_paged_token_slots_extend(
            tree_cache=self.tree, prefix_lens=t(prefix), prefix_lens_cpu=t(prefix), seq_lens=t(seq),
            seq_lens_cpu=t(seq), last_loc=t(last), extend_num_tokens=sum(new_tokens), req_pool_indices=t(rows))
        # write_cache_indices' non-Triton branch (the function itself needs a published server config)
        pt = 0
        for r, p, q in zip(rows, prefix, seq):
            self.rtp.write((r, slice(p, q)), out[pt:pt + q - p])
            pt += q - p
        self.lens.update(zip(rows, seq))
        self.write(out)
        return out

    def decode(self, rows):
        seq = [self.lens[r] + 1 for r in rows]
        last = [int(self.rtp.req_to_token[r, self.lens[r] - 1]) for r in rows]
        t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
        out = allocation.alloc_paged_token_slots_decode(tree_cache=self.tree, seq_lens=t(seq), seq_lens_cpu=t(seq),
                                                        last_loc=t(last))
        for r, loc in zip(rows, out.tolist()):
            self.rtp.req_to_token[r, self.lens[r]] = loc
            self.lens[r] += 1
        self.write(out)
        return out

    def write(self, locs):
        """K/V of each new token through the real set_kv_buffer: value = its token id (mod 2048)."""
        vals = (locs % 2048).to(torch.float16).view(-1, 1, 1).expand(-1, HEADS, HEAD_DIM)
        for layer in range(LAYERS):
            self.kv.set_kv_buffer(types.SimpleNamespace(layer_id=layer), locs, vals + layer, -vals - layer)

    def check_kv(self, row):
        locs = self.rtp.req_to_token[row, :self.lens[row]].long()
        for layer in range(LAYERS):
            k = self.kv.get_key_buffer(layer)[locs]
            v = self.kv.get_value_buffer(layer)[locs]
            want = (locs % 2048).to(torch.float16).view(-1, 1, 1)
            assert torch.equal(k, (want + layer).expand_as(k)) and torch.equal(v, (-want - layer).expand_as(v))
        # the same bytes straight from the vmem reservation (K plane of layer 0, the row's slot)
        slot = self.alloc.slots.slot_of_row(row)
        k_plane, _ = self.kv.vmem_cache.kv(0)
        assert torch.equal(k_plane[slot, :self.lens[row], 0, 0], (locs % 2048).to(torch.float16))

    def finish(self, row):
        """cache_finished_req with the radix cache off: free the row's tokens, then the row."""
        self.alloc.free(self.rtp.req_to_token[row, :self.lens.pop(row)].long())
        self.rtp.free_rows([row])


def test_hooks_are_installed_by_the_entry_point():
    from sglang.srt.plugins.hook_registry import HookRegistry

    import vmem_sglang

    hooks = {target: [h for _, h, _ in entries] for target, entries in HookRegistry._hooks.items()}
    assert vmem_sglang.around_alloc_extend in hooks["sglang.srt.mem_cache.allocation.alloc_paged_token_slots_extend"]
    assert vmem_sglang.around_alloc_decode in hooks["sglang.srt.mem_cache.allocation.alloc_paged_token_slots_decode"]
    assert vmem_sglang.around_free_rows in hooks["sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free_rows"]
    configurator = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator."
    for method in ("_build_token_to_kv_pool", "_build_mha_kv_pool", "_build_token_to_kv_pool_allocator"):
        assert hooks[configurator + method], method
    # applied: the module attribute SGLang calls is the wrapped function
    assert hasattr(allocation.alloc_paged_token_slots_extend, "__wrapped__")


def test_pool_buffers_are_virtual_tensors_and_only_the_padding_page_is_mapped():
    h = Harness()
    assert isinstance(h.kv, MHATokenToKVPool)
    assert h.kv.k_buffer[0].shape == ((2 * ROWS + 1) * h.kv.row_tokens, HEADS, HEAD_DIM)   # + tree rows
    assert h.kv.row_tokens % PAGE == 0 and h.kv.row_tokens >= CTX
    res = h.kv.vmem_cache.reservation
    assert h.kv.k_buffer[0].data_ptr() >= res.address
    s = h.kv.vmem_cache.stats()
    assert s.mapped_pages == s.used_pages == 2 * LAYERS                    # row 0, first page of each plane
    assert h.alloc.available_size() == TOKENS
    h.write(torch.tensor([0, 0, 0]))                                        # padded writes land in token 0


def test_admit_grow_finish_and_kv_reads_back_from_vmem():
    h = Harness()
    rows = h.rtp.alloc_rows(2)
    out = h.extend(rows, [20, 40])
    rt = h.kv.row_tokens
    s0, s1 = h.alloc.slots.slot_of_row(rows[0]), h.alloc.slots.slot_of_row(rows[1])
    assert out.tolist() == list(range(s0 * rt, s0 * rt + 20)) + list(range(s1 * rt, s1 * rt + 40))
    assert h.alloc.available_size() == TOKENS - 16 * (2 + 3)
    for _ in range(13):                                                     # row 0 grows into its third page
        h.decode(rows)
    assert h.lens == {rows[0]: 33, rows[1]: 53}
    assert h.alloc.available_size() == TOKENS - 16 * (3 + 4)
    h.extend([rows[0]], [30])                                               # a second chunk (prefix 33)
    for r in rows:
        h.check_kv(r)
    h.alloc.check_integrity()
    # the reservation's own page table shows the slot's row mapped exactly as far as the cache says
    spec = h.kv.vmem_cache.spec
    table = h.kv.vmem_cache.reservation.mapping()
    pages = spec.slot_virtual_pages(s0, 0, spec.pages_per_row)[0]
    assert (table[pages[:4]] >= 0).all() and (table[pages[4:]] == -1).all()
    h.finish(rows[0])
    assert h.alloc.slots.slot_of_row(rows[0]) is None
    st = h.kv.vmem_cache.stats()
    assert st.reclaimable_pages == 4 * 2 * LAYERS                           # deferred: still mapped
    assert h.alloc.available_size() == TOKENS - 16 * 4
    h.alloc.check_integrity()


def test_next_request_reuses_the_slot_pages_and_oom_returns_none():
    h = Harness(tokens=96)                                                  # 6 pages of tokens per plane
    r0, = h.rtp.alloc_rows(1)
    h.extend([r0], [64])
    h.finish(r0)
    mapped_before = h.kv.vmem_cache.stats().pages_mapped
    r1, = h.rtp.alloc_rows(1)
    h.extend([r1], [50])                                                    # fits in the idle slot's pages
    assert h.kv.vmem_cache.stats().pages_mapped == mapped_before
    r2, = h.rtp.alloc_rows(1)
    h.extend([r2], [32])                                                    # 2 more pages: reclaimed from r1's slot tail
    h.alloc.check_integrity()
    r3, = h.rtp.alloc_rows(1)
    before = h.kv.vmem_cache.stats()
    with pytest.raises(RuntimeError, match="out of memory"):                # SGLang's own message for None
        h.extend([r3], [40])
    after = h.kv.vmem_cache.stats()
    assert after._replace(peak_live_slots=0) == before._replace(peak_live_slots=0)
    assert h.alloc.slots.slot_of_row(r3) is None
    h.alloc.check_integrity()
    for r in (r1, r2):
        h.check_kv(r)


def test_retract_frees_the_row_and_ids_match_the_stock_allocator_layout():
    h = Harness()
    rows = h.rtp.alloc_rows(3)
    h.extend(rows, [17, 5, 40])
    h.finish(rows[1])                                                       # retracted mid-flight
    assert h.alloc.slots.slot_of_row(rows[1]) is None
    h.decode([rows[0], rows[2]])
    # SGLang's paged kernels assume ids within a page are consecutive and page-aligned: check that
    for r in (rows[0], rows[2]):
        ids = h.rtp.req_to_token[r, :h.lens[r]].long()
        assert (ids[::PAGE] % PAGE == 0).all() and torch.equal(ids - ids[0], torch.arange(len(ids)))
    h.alloc.check_integrity()


def test_refuses_what_it_cannot_do():
    h = Harness()
    with pytest.raises(VmemInvalidArgument):
        h.alloc.alloc(8)                                                    # page size 1 path: no request
    with pytest.raises(VmemInvalidArgument):
        VmemMHATokenToKVPool(64, page_size=4, dtype=torch.float16, head_num=HEADS, head_dim=HEAD_DIM,
                             layer_num=1, device="cpu", enable_memory_saver=False, num_rows=2, max_context_len=64,
                             backend="host")                                 # 4-token page = 1 KiB < a vmem page
    with pytest.raises(VmemInvalidArgument):
        h.alloc.free(torch.tensor([3 * h.kv.row_tokens]))                   # a slot nobody holds


# ---- the radix cache on: SGLang's real RadixCache shares token ids between requests --------------------
from array import array  # noqa: E402

from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402


class RadixHarness(Harness):
    """Harness with RadixCache(disable=False): a request matches its prompt's cached prefix, reads those
    ids from whichever row computed them, and at finish the tree keeps its page-aligned tokens (what
    release_kv_cache's checkpoint does: insert, free the duplicates, free the unaligned tail, free the row).
    K/V of a token = f(token, position), so a shared prefix reads the same values whoever computed it."""

    def __init__(self, tokens=TOKENS):
        super().__init__(tokens)
        self.tree = RadixCache(CacheInitParams(disable=False, req_to_token_pool=self.rtp,
                                               token_to_kv_pool_allocator=self.alloc, page_size=PAGE))
        self.alloc.attach_req_to_token_pool(self.rtp)
        self.ids, self.node, self.protected = {}, {}, {}

    @staticmethod
    def value(tokens, start=0):
        return ((torch.as_tensor(tokens, dtype=torch.int64) * 7 + torch.arange(start, start + len(tokens))) % 2048)

    def admit(self, tokens):
        row, = self.rtp.alloc_rows(1)
        m = self.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens[:-1]))))
        prefix = self.tree.path_device_indices(m.last_device_node)
        self.tree.inc_lock_ref(m.last_device_node)
        self.node[row], self.protected[row], self.ids[row] = m.last_device_node, len(prefix), list(tokens)
        if len(prefix):
            self.rtp.write((row, slice(0, len(prefix))), prefix.to(torch.int32))
        self.lens[row] = len(prefix)
        self.extend([row], [len(tokens) - len(prefix)])
        return row, len(prefix)

    def write_row(self, row, first, locs):
        vals = self.value(self.ids[row][first:first + len(locs)], first).to(torch.float16).view(-1, 1, 1)
        for layer in range(LAYERS):
            self.kv.set_kv_buffer(types.SimpleNamespace(layer_id=layer), locs, vals.expand(-1, HEADS, HEAD_DIM) + layer,
                                  -vals.expand(-1, HEADS, HEAD_DIM) - layer)

    def extend(self, rows, new_tokens):
        firsts = [self.lens.get(r, 0) for r in rows]
        self.write = lambda out: None                   # values depend on the row: written below
        out = super().extend(rows, new_tokens)
        pt = 0
        for r, f, n in zip(rows, firsts, new_tokens):
            self.write_row(r, f, out[pt:pt + n])
            pt += n
        return out

    def decode_tokens(self, rows, tokens):
        for r, t in zip(rows, tokens):
            self.ids[r].append(t)
        seq = [self.lens[r] + 1 for r in rows]
        last = [int(self.rtp.req_to_token[r, self.lens[r] - 1]) for r in rows]
        t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
        out = allocation.alloc_paged_token_slots_decode(tree_cache=self.tree, seq_lens=t(seq), seq_lens_cpu=t(seq),
                                                        last_loc=t(last), req_pool_indices=t(rows))
        for r, loc in zip(rows, out.tolist()):
            self.rtp.req_to_token[r, self.lens[r]] = loc
            self.write_row(r, self.lens[r], torch.tensor([loc]))
            self.lens[r] += 1
        return out

    def check_kv(self, row):
        locs = self.rtp.req_to_token[row, :self.lens[row]].long()
        want = self.value(self.ids[row][:self.lens[row]]).to(torch.float16).view(-1, 1, 1)
        for layer in range(LAYERS):
            k, v = self.kv.get_key_buffer(layer)[locs], self.kv.get_value_buffer(layer)[locs]
            assert torch.equal(k, (want + layer).expand_as(k)) and torch.equal(v, (-want - layer).expand_as(v))

    def finish(self, row):
        n = self.lens.pop(row)
        aligned = n // PAGE * PAGE
        kv = self.rtp.req_to_token[row, :n].long().clone()
        res = self.tree.insert(InsertParams(key=RadixKey(array("q", self.ids[row][:aligned])), value=kv[:aligned]))
        p = self.protected.pop(row)
        if res.prefix_len > p:                          # tokens another request put in the tree first
            self.alloc.free_segment(kv[p:res.prefix_len], start_pos=p)
        if n > aligned:
            self.alloc.free_segment(kv[aligned:], start_pos=aligned)
        self.tree.dec_lock_ref(self.node.pop(row))
        self.rtp.free_rows([row])                       # the plugin's hook tells the allocator


PROMPT = list(range(100, 140))                          # 40 tokens: 2 whole pages + 8


def test_radix_cache_keeps_finished_tokens_mapped_and_a_hit_continues_in_their_slot():
    h = RadixHarness()
    rt = h.kv.row_tokens
    a, p = h.admit(PROMPT)
    assert p == 0
    sa = h.alloc.slots.slot_of_row(a)
    for t in (1, 2, 3):
        h.decode_tokens([a], [t])
    h.check_kv(a)
    h.finish(a)                                         # the tree keeps [0, 32) of slot sa
    assert h.alloc.slots.slot_of_row(a) is None and sa in h.kv.vmem_cache.live_slots
    assert h.alloc.slots.held_pages(sa) == 2 and h.kv.vmem_cache.length(sa) == 32
    assert h.tree.evictable_size() == 32
    h.alloc.check_integrity()
    # the same prompt again: the tree hands out slot sa's ids for [0, 32); the request continues there
    b, p = h.admit(PROMPT + list(range(10)))
    assert p == 32 and h.alloc.slots.slot_of_row(b) == sa
    assert h.rtp.req_to_token[b, :h.lens[b]].long().tolist() == list(range(sa * rt, sa * rt + 50))
    # a third one while b writes slot sa: a fresh slot for its own tokens, the prefix read from sa
    c, p = h.admit(PROMPT[:32] + [9, 9, 9])
    sc = h.alloc.slots.slot_of_row(c)
    assert p == 32 and sc not in (0, sa)
    assert h.rtp.req_to_token[c, 31] == sa * rt + 31 and h.rtp.req_to_token[c, 32] == sc * rt + 32
    h.decode_tokens([b, c], [5, 6])
    for r in (b, c):
        h.check_kv(r)
    h.alloc.check_integrity()
    h.finish(b), h.finish(c)
    # nothing runs: eviction gives pages back, and the slots once nothing of them is held
    stats = h.kv.vmem_cache.stats()
    evicted = h.tree.evict(EvictParams(num_tokens=h.tree.evictable_size())).num_tokens_evicted
    assert evicted == 48                                # [0, 32) and b's [32, 48), both in slot sa
    after = h.kv.vmem_cache.stats()
    assert after.reclaimable_pages > stats.reclaimable_pages
    assert h.kv.vmem_cache.live_slots == [0]
    assert h.alloc.available_size() == TOKENS
    h.alloc.check_integrity()


def test_radix_cache_eviction_under_memory_pressure_keeps_running_requests_intact():
    """A small pool: admitting needs the tree to evict (SGLang's evict_from_tree_cache in the allocation
    path), and the requests still running read their K/V unchanged."""
    h = RadixHarness(tokens=128)                        # 8 pages of tokens
    first, _ = h.admit(list(range(1, 49)))              # 3 pages
    h.finish(first)                                     # the tree keeps all 48
    keep, _ = h.admit(list(range(500, 540)))            # 3 pages: 6 in use
    big, _ = h.admit(list(range(900, 940)))             # 3 more: the tree must give back its pages
    assert h.tree.evictable_size() < 48
    for r in (keep, big):
        h.check_kv(r)
    h.alloc.check_integrity()
