"""vmem's SGLang plugin, its own logic, without SGLang: row geometry, arithmetic token ids, row -> slot
bookkeeping and page accounting over a real VirtualKVCache on the host backend.
(tests/integration/test_sglang_plugin.py drives the same code through SGLang's real classes.)"""

import pathlib
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "integrations" / "sglang"))

from vmem.backends import get_backend  # noqa: E402
from vmem.errors import VmemIntegrityError, VmemInvalidArgument  # noqa: E402
from vmem_sglang import TokenSlots, make_cache, row_geometry  # noqa: E402

PAGE = 16          # SGLang page: 16 tokens x 2 heads x 64 x fp16 = 4 KiB = one host page per K/V plane


@pytest.fixture
def slots():
    cache, row_tokens = make_cache(num_rows=4, max_context_len=100, page_size=PAGE, num_tokens=96, head_num=2,
                                   head_dim=64, layer_num=2, dtype=torch.float16, backend=get_backend("host"))
    yield TokenSlots(cache, row_tokens, PAGE)
    cache.close()


def test_row_geometry_rounds_to_vmem_and_sglang_pages():
    assert row_geometry(2, 64, torch.float16, 100, 16, 4096) == 112
    assert row_geometry(2, 64, torch.float16, 100, 32, 4096) == 128
    assert row_geometry(1, 64, torch.float16, 10, 64, 8192) == 64
    with pytest.raises(VmemInvalidArgument, match="--page-size 16"):
        row_geometry(2, 64, torch.float16, 100, 8, 4096)          # 8 tokens = 2 KiB: half a vmem page


def test_padding_row_is_slot_zero_with_its_first_page_mapped(slots):
    spec = slots.cache.spec
    assert slots.cache.live_slots == [0] and slots.cache.length(0) == PAGE
    assert slots.cache.stats().used_pages == spec.rows_per_slot
    assert slots.available_tokens() == 96
    k, _ = slots.cache.kv(0)
    k[0, 0].fill_(1.0)                                              # token 0 is writable (padded batches)


def test_extend_gives_arithmetic_ids_and_maps_whole_pages(slots):
    rt = slots.row_tokens
    out = slots.extend([3, 1], [0, 0], [20, 5])
    s3, s1 = slots.slot_of_row(3), slots.slot_of_row(1)
    assert {s3, s1} == {1, 2}
    assert out.tolist() == list(range(s3 * rt, s3 * rt + 20)) + list(range(s1 * rt, s1 * rt + 5))
    assert slots.available_tokens() == 96 - 16 * 3                 # 2 pages + 1 page
    out = slots.decode([s3 * rt + 19, s1 * rt + 4], [21, 6])
    assert out.tolist() == [s3 * rt + 20, s1 * rt + 5]
    out = slots.extend([3], [21], [40])                             # a second chunk of row 3
    assert out.tolist() == list(range(s3 * rt + 21, s3 * rt + 40))
    assert slots.available_tokens() == 96 - 16 * 4
    slots.check_integrity()
    # the data written at an id sits at [slot, pos] of the virtual tensor
    k, _ = slots.cache.kv(1)
    flat = k.view(-1, 2, 64)
    flat[s3 * rt + 33] = 7.0
    assert float(k[s3, 33, 1, 63]) == 7.0


def test_free_releases_the_row_and_the_next_request_reuses_its_pages(slots):
    rt = slots.row_tokens
    slots.extend([2], [0], [40])
    s = slots.slot_of_row(2)
    mapped = slots.cache.stats().pages_mapped
    assert slots.free(np.arange(s * rt + 32, s * rt + 40)) == []   # a tail alone keeps the slot
    assert slots.free(np.arange(s * rt, s * rt + 32)) == [2]
    assert slots.slot_of_row(2) is None
    assert slots.cache.stats().reclaimable_pages == 3 * slots.cache.spec.rows_per_slot
    assert slots.available_tokens() == 96                          # reclaimable counts as available
    slots.extend([4], [0], [30])
    assert slots.slot_of_row(4) == s                               # the mapped slot is preferred
    assert slots.cache.stats().pages_mapped == mapped              # no map call
    slots.check_integrity()


def test_out_of_memory_returns_none_and_changes_nothing(slots):
    slots.extend([1], [0], [80])
    before = slots.cache.stats()
    assert slots.extend([2], [0], [40]) is None                    # 5 + 3 pages > 6
    assert slots.slot_of_row(2) is None
    after = slots.cache.stats()
    assert after._replace(peak_live_slots=0) == before._replace(peak_live_slots=0)
    slots.check_integrity()
    assert slots.decode([slots.slot_of_row(1) * slots.row_tokens + 79], [81]) is not None   # 6th page
    assert slots.decode([slots.slot_of_row(1) * slots.row_tokens + 96], [97]) is None       # a 7th: no


def test_bad_input_is_refused(slots):
    with pytest.raises(VmemInvalidArgument):
        slots.extend([1], [0], [slots.row_tokens + 1])
    with pytest.raises(VmemInvalidArgument):
        slots.decode([3 * slots.row_tokens], [2])                   # nobody holds slot 3
    with pytest.raises(VmemInvalidArgument):
        slots.free(np.array([2 * slots.row_tokens]))
    slots.check_integrity()


def test_integrity_check_sees_a_lost_row(slots):
    slots.extend([1], [0], [10])
    slots._row_of_slot.clear()
    with pytest.raises(VmemIntegrityError):
        slots.check_integrity()


# ---- the radix (prefix) cache: slots the tree holds after their request -------------------------------

def _fill(slots, ids):
    """K of layer 0 at each id: the id itself (mod 2048)."""
    k = slots.cache.kv(0)[0].view(-1, 2, 64)
    k[torch.from_numpy(ids)] = torch.from_numpy(ids % 2048).to(torch.float16).view(-1, 1, 1)


def _intact(slots, ids):
    k = slots.cache.kv(0)[0].view(-1, 2, 64)
    return torch.equal(k[torch.from_numpy(ids), 0, 0], torch.from_numpy(ids % 2048).to(torch.float16))


@pytest.fixture
def roomy():
    cache, row_tokens = make_cache(num_rows=4, max_context_len=100, page_size=PAGE, num_tokens=192, head_num=2,
                                   head_dim=64, layer_num=2, dtype=torch.float16, backend=get_backend("host"))
    yield TokenSlots(cache, row_tokens, PAGE)
    cache.close()


def test_tree_held_tokens_stay_mapped_and_a_prefix_hit_continues_in_their_slot(roomy):
    """What SGLang's radix cache does to a row: request 1 finishes with [0, 32) kept by the tree (its tail
    page freed), request 2 hits that prefix and continues in the same slot (no pages mapped twice), request
    3 hits it while 2 writes there and gets a fresh slot (its [0, 32) mapped, unused); eviction frees
    pages, then the slot."""
    slots = roomy
    slots.track_rows = True                                        # as attach_req_to_token_pool sets it
    rt, rows_per = slots.row_tokens, slots.cache.spec.rows_per_slot
    a_ids = slots.extend([1], [0], [40])
    a = slots.slot_of_row(1)
    _fill(slots, a_ids)
    slots.free(a_ids[32:])                                         # the unaligned tail page
    slots.rows_released([1])                                       # ReqToTokenPool.free_rows
    assert slots.slot_of_row(1) is None and a in slots.cache.live_slots and slots.held_pages(a) == 2
    assert slots.cache.length(a) == 32 and slots.cache.stats().reclaimable_pages == rows_per
    assert _intact(slots, a_ids[:32])
    slots.check_integrity()
    mapped = slots.cache.stats().pages_mapped
    b_ids = slots.extend([2], [32], [50], last_locs=[a * rt + 31])
    assert slots.slot_of_row(2) == a and b_ids.tolist() == list(range(a * rt + 32, a * rt + 50))
    assert slots.cache.stats().pages_mapped == mapped + rows_per   # page 2 was still mapped; page 3 is new
    c_ids = slots.extend([3], [32], [45], last_locs=[a * rt + 31])
    c = slots.slot_of_row(3)
    assert c not in (0, a) and c_ids.tolist() == list(range(c * rt + 32, c * rt + 45))
    _fill(slots, b_ids), _fill(slots, c_ids)
    assert slots.decode([int(b_ids[-1])], [51], rows=[2]).tolist() == [a * rt + 50]
    slots.check_integrity()
    # request 2 finishes: the tree keeps [32, 48) of its slot, frees the rest; request 3 still reads [0, 32)
    slots.free(np.arange(a * rt + 48, a * rt + 51))
    slots.rows_released([2])
    assert slots.held_pages(a) == 3 and slots.cache.length(a) == 48
    slots.free(np.arange(a * rt + 32, a * rt + 48))                # the tree evicts request 2's leaf
    assert slots.held_pages(a) == 2 and slots.cache.length(a) == 32
    assert _intact(slots, a_ids[:32]) and _intact(slots, c_ids)
    slots.check_integrity()
    slots.free(c_ids), slots.rows_released([3])                    # request 3 done (its slot: nothing held)
    assert c not in slots.cache.live_slots
    before = slots.available_tokens()
    slots.free(a_ids[:32])                                         # the tree evicts the prefix
    assert a not in slots.cache.live_slots and slots.available_tokens() == before + 32   # reclaimable now
    assert slots.cache.stats().used_pages == rows_per              # only the padding page is in use
    slots.check_integrity()


def test_a_prefix_hit_where_nothing_is_cached_after_it_does_not_take_a_written_slot(slots):
    slots.track_rows = True
    rt = slots.row_tokens
    ids = slots.extend([1], [0], [64])                             # request 1 still running in its slot
    a = slots.slot_of_row(1)
    b = slots.extend([2], [16], [20], last_locs=[a * rt + 15])     # a prefix of it, but a writes there
    assert slots.slot_of_row(2) != a and int(b[0]) % rt == 16
    slots.free(ids[16:]), slots.rows_released([1])
    # the tree holds [0, 16) of a; a prefix that ends mid-slot while pages after it are held: no continuation
    slots.extend([1], [0], [8])                                    # row 1 reused by a new request
    assert slots.slot_of_row(1) not in (a, slots.slot_of_row(2))
    slots.check_integrity()


def test_free_of_tokens_not_allocated_is_refused_and_changes_nothing(slots):
    slots.track_rows = True
    ids = slots.extend([1], [0], [20])
    slots.free(ids[16:])
    with pytest.raises(VmemInvalidArgument):
        slots.free(ids[10:20])                                     # page 1 was freed already
    assert slots.held_pages(slots.slot_of_row(1)) == 1
    slots.check_integrity()


def test_every_slot_held_by_the_tree_reports_nothing_available():
    """With all slots taken and some held only by the tree, available_size is 0 so that SGLang evicts."""
    cache, rt = make_cache(num_rows=2, max_context_len=32, page_size=PAGE, num_tokens=96, head_num=2,
                           head_dim=64, layer_num=1, dtype=torch.float16, backend=get_backend("host"),
                           extra_slots=0)
    try:
        slots = TokenSlots(cache, rt, PAGE)
        slots.track_rows = True
        kept = [slots.extend([r], [0], [16]) for r in (1, 2)]
        slots.rows_released([1, 2])                                # both finished, the tree keeps them
        assert slots.available_tokens() == 0
        slots.free(kept[0])                                        # evicted: a slot is free again
        assert slots.available_tokens() > 0
        slots.check_integrity()
    finally:
        cache.close()


# ---- state machine: requests through TokenSlots as SGLang's scheduler drives the allocator -----------
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402


class RowsAndTokens(RuleBasedStateMachine):
    """Rows extended, decoded and freed at random; refusals change nothing; every token written keeps
    its value (K of layer 0 holds the token's own position) while its request lives."""

    ROWS = 4

    @initialize()
    def setup(self):
        self.cache, rt = make_cache(num_rows=self.ROWS, max_context_len=64, page_size=PAGE, num_tokens=80,
                                    head_num=2, head_dim=64, layer_num=1, dtype=torch.float16,
                                    backend=get_backend("host"))
        self.slots = TokenSlots(self.cache, rt, PAGE)
        self.k = self.cache.kv(0)[0].view(-1, 2, 64)
        self.lens = {}                                   # row -> tokens

    def teardown(self):
        if hasattr(self, "cache"):
            del self.k
            self.cache.close()

    def _write(self, ids):
        if ids is not None and len(ids):
            self.k[torch.from_numpy(ids)] = torch.from_numpy(ids % self.slots.row_tokens).to(torch.float16).view(-1, 1, 1)

    @precondition(lambda self: len(self.lens) < self.ROWS)
    @rule(n=st.integers(1, 40))
    def extend_new(self, n):
        row = min(set(range(1, self.ROWS + 1)) - set(self.lens))
        before = self.slots.available_tokens()
        ids = self.slots.extend([row], [0], [n])
        if ids is None:
            assert self.slots.slot_of_row(row) is None and self.slots.available_tokens() == before
            return
        self._write(ids)
        self.lens[row] = n

    @precondition(lambda self: self.lens)
    @rule(data=st.data(), n=st.integers(1, 20))
    def extend_more(self, data, n):
        row = data.draw(st.sampled_from(sorted(self.lens)))
        n = min(n, self.slots.row_tokens - self.lens[row])
        ids = self.slots.extend([row], [self.lens[row]], [self.lens[row] + n])
        if ids is not None:
            self._write(ids)
            self.lens[row] += n

    @precondition(lambda self: any(n < 64 for n in self.lens.values()))
    @rule(data=st.data())
    def decode(self, data):
        row = data.draw(st.sampled_from(sorted(r for r, n in self.lens.items() if n < 64)))
        last = self.slots.slot_of_row(row) * self.slots.row_tokens + self.lens[row] - 1
        ids = self.slots.decode([last], [self.lens[row] + 1])
        if ids is not None:
            self._write(ids)
            self.lens[row] += 1

    @precondition(lambda self: self.lens)
    @rule(data=st.data())
    def finish(self, data):
        row = data.draw(st.sampled_from(sorted(self.lens)))
        slot = self.slots.slot_of_row(row)
        assert self.slots.free(slot * self.slots.row_tokens + np.arange(self.lens.pop(row))) == [row]

    @invariant()
    def consistent(self):
        if not hasattr(self, "cache"):
            return
        self.slots.check_integrity()
        for row, n in self.lens.items():
            slot = self.slots.slot_of_row(row)
            got = self.k[slot * self.slots.row_tokens + torch.arange(n), 0, 0]
            assert torch.equal(got, torch.arange(n, dtype=torch.float16))


TestRowsAndTokens = RowsAndTokens.TestCase
