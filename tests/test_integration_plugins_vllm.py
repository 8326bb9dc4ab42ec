"""vmem's vLLM plugin, its own logic, without vLLM: slot/block-id arithmetic, block -> page placement,
the scheduler-side slot table, and the worker-side mapper on the real host backend.
(tests/integration/test_vllm_*.py drive the same code through vLLM's real classes.)"""

import pathlib
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "integrations" / "vllm"))

from vmem.backends import get_backend  # noqa: E402
from vmem.errors import VmemIntegrityError, VmemInvalidArgument, VmemOutOfMemory, VmemSlotError  # noqa: E402
from vmem_vllm import BlockMapper, BlockPages, SlotLayout, SlotTable, TensorPlacement  # noqa: E402

PAGE = 4096


# ---- slot layout ----------------------------------------------------------------------------------
def test_block_ids_are_contiguous_per_slot_and_skip_the_null_block():
    lay = SlotLayout(num_slots=3, blocks_per_slot=4)
    assert lay.num_virtual_blocks == 13
    assert lay.block_ids(0, 0, 4) == [1, 2, 3, 4]
    assert lay.block_ids(2, 1, 3) == [10, 11]
    assert [lay.slot_of(b) for b in (1, 4, 5, 12)] == [0, 0, 1, 2]
    assert [lay.index_in_slot(b) for b in (1, 4, 5, 12)] == [0, 3, 0, 3]
    for slot in range(3):
        for j in range(4):
            b = lay.block_id(slot, j)
            assert (lay.slot_of(b), lay.index_in_slot(b)) == (slot, j)


def test_slot_layout_for_model_rounds_up_and_rejects_bad_input():
    assert SlotLayout.for_model(max_num_seqs=8, max_model_len=100, block_size=16) == SlotLayout(8, 7)
    with pytest.raises(VmemInvalidArgument):
        SlotLayout(0, 4)
    with pytest.raises(VmemInvalidArgument):
        SlotLayout(2, 4).block_id(2, 0)
    with pytest.raises(VmemInvalidArgument):
        SlotLayout(2, 4).block_ids(1, 2, 5)


# ---- block pages ----------------------------------------------------------------------------------
def test_layer_outermost_block_spans_one_run_per_layer():
    # LBHNC: layer l of block b at l*V*page + b*page
    num_blocks, page = 7, 2 * PAGE
    bp = BlockPages([TensorPlacement(0, 3, page * num_blocks, page, page)], PAGE, num_blocks)
    assert bp.pages_per_block == 6
    assert bp.pages([2]).tolist() == [4, 5, 18, 19, 32, 33]
    assert bp.num_bytes == 3 * num_blocks * page


def test_block_outermost_block_is_one_run_over_all_layers():
    # BLHNC: a block holds every layer's page back to back (vAttention's MegaCache idea)
    layer_page = PAGE // 2
    bp = BlockPages([TensorPlacement(0, 4, layer_page, 4 * layer_page, layer_page)], PAGE, 5)
    assert bp.pages_per_block == 2
    assert bp.pages([0, 3]).tolist() == [0, 1, 6, 7]


def test_block_pages_refuse_blocks_that_share_a_page():
    with pytest.raises(VmemInvalidArgument, match="whole"):
        BlockPages([TensorPlacement(0, 3, 1024, PAGE, 1024)], PAGE, 8)     # 3 KiB of each 4 KiB block page
    with pytest.raises(VmemInvalidArgument, match="multiple"):
        BlockPages([TensorPlacement(0, 2, 1024 * 8, 1024, 1024)], PAGE, 8)     # 1 KiB blocks in 4 KiB pages


# ---- slot table -----------------------------------------------------------------------------------
def test_slot_table_reuses_last_freed_slot_and_drains_before_reuse():
    table = SlotTable(SlotLayout(3, 4), num_physical_blocks=6)
    assert table.acquire("a") == 0 and table.acquire("b") == 1
    table.take_blocks(0, 3)
    table.take_blocks(1, 2)
    assert table.num_free_physical_blocks == 1
    with pytest.raises(VmemInvalidArgument):
        table.take_blocks(1, 2)                     # over the physical budget: nothing changes
    table.release("a")                              # blocks not back yet: slot 0 drains
    assert table.num_free_slots == 1 and table.acquire("c") == 2
    assert not table.can_admit("d")
    table.return_blocks([1, 2, 3])                  # slot 0's blocks come home
    table.check()
    assert table.acquire("d") == 0                  # the most recently freed slot
    table.check()
    with pytest.raises(VmemSlotError):
        table.acquire("e")
    with pytest.raises(VmemInvalidArgument):
        table.return_blocks([1])                    # slot 0 has none out


# ---- worker-side mapper on the real host backend ----------------------------------------------------
@pytest.fixture
def mapper():
    lay = SlotLayout(num_slots=4, blocks_per_slot=3)
    v = lay.num_virtual_blocks
    page = 2 * PAGE                                  # one layer's block: 2 pages
    bp = BlockPages([TensorPlacement(0, 2, page * v, page, page)], PAGE, v)
    m = BlockMapper(get_backend("host"), bp, lay, num_physical_blocks=5)
    buf = m.reservation.tensor(torch.int8, (bp.num_bytes,)).view(2, v, page)    # [layer, block, bytes]
    yield m, lay, buf
    del buf
    m.close()


def test_mapper_maps_new_blocks_and_data_lands_in_vmem_memory(mapper):
    m, lay, buf = mapper
    assert m.is_mapped(0)                                           # the null block, for good
    m.apply(assigned={"a": lay.block_ids(1, 0, 2)})
    assert [m.is_mapped(b) for b in (4, 5, 6)] == [True, True, False]
    m.check_integrity()
    buf[0, 4].fill_(3)
    buf[1, 5].fill_(-2)
    # read back through a second view of the same reservation: same physical pages
    again = m.reservation.tensor(torch.int8, (m.reservation.num_bytes,))
    page = buf.shape[2]
    v = lay.num_virtual_blocks
    assert int(again[4 * page:5 * page].sum()) == 3 * page
    assert int(again[(v + 5) * page:(v + 6) * page].sum()) == -2 * page
    table = m.reservation.mapping()
    assert (table[m.block_pages.pages([4, 5])] >= 0).all()
    assert (table[m.block_pages.pages([6, 7])] == -1).all()
    assert m.stats()["live_blocks"] == 2 and m.stats()["free_blocks"] == 3


def test_mapper_defers_reclamation_and_reuses_a_slot_without_mapping(mapper):
    m, lay, buf = mapper
    m.apply(assigned={"a": lay.block_ids(0, 0, 2)})
    buf[0, 1].fill_(9)
    calls = m.stats()["map_calls"]
    m.apply(removed=["a"])
    assert m.stats()["reclaimable_blocks"] == 2 and m.is_mapped(1)
    m.apply(assigned={"b": lay.block_ids(0, 0, 2)})                  # next request in slot 0
    assert m.stats()["map_calls"] == calls and m.stats()["blocks_reused"] == 2
    assert int(buf[0, 1, 0]) == 9                                   # the same physical page
    m.check_integrity()


def test_mapper_reclaims_idle_tail_blocks_when_the_pool_runs_dry(mapper):
    m, lay, buf = mapper
    m.apply(assigned={"a": lay.block_ids(0, 0, 3), "b": lay.block_ids(1, 0, 2)})   # 5 of 5 blocks
    m.apply(removed=["a"])
    m.apply(assigned={"c": lay.block_ids(2, 0, 2)})                  # needs 2: slot 0's tail goes first
    assert [m.is_mapped(b) for b in lay.block_ids(0, 0, 3)] == [True, False, False]
    assert m.stats()["blocks_unmapped"] == 2
    m.check_integrity()


def test_mapper_out_of_memory_changes_nothing(mapper):
    m, lay, buf = mapper
    m.apply(assigned={"a": lay.block_ids(0, 0, 3)})
    before = m.stats()
    with pytest.raises(VmemOutOfMemory) as err:
        m.apply(assigned={"b": lay.block_ids(1, 0, 3)})              # 6 live > 5 physical
    assert err.value.needed_pages == 3 * m.block_pages.pages_per_block
    assert m.stats() == before
    m.check_integrity()
    with pytest.raises(VmemInvalidArgument):
        m.apply(assigned={"b": [0]})                                 # the null block is nobody's


def test_mapper_eager_reclamation_unmaps_at_free():
    lay = SlotLayout(2, 2)
    bp = BlockPages([TensorPlacement(0, 1, PAGE, PAGE, PAGE)], PAGE, lay.num_virtual_blocks)
    m = BlockMapper(get_backend("host"), bp, lay, 4, reclaim="eager")
    m.apply(assigned={"a": [1, 2]})
    m.apply(removed=["a"])
    assert not m.is_mapped(1) and m.stats()["free_blocks"] == 4
    m.check_integrity()
    m.close()


def test_mapper_reclaims_the_slot_idle_longest_first(mapper):
    m, lay, buf = mapper
    m.apply(assigned={"a": lay.block_ids(0, 0, 2), "b": lay.block_ids(1, 0, 2)})
    m.apply(removed=["a"])
    m.apply(removed=["b"])                                          # slot 0 has been idle longer
    m.apply(assigned={"c": lay.block_ids(2, 0, 3)})                  # 1 free block: 2 more come back
    assert [m.is_mapped(b) for b in lay.block_ids(0, 0, 2)] == [False, False]
    assert [m.is_mapped(b) for b in lay.block_ids(1, 0, 2)] == [True, True]
    m.check_integrity()


def test_mapper_places_a_slots_next_block_after_its_last_one():
    lay = SlotLayout(2, 4)
    bp = BlockPages([TensorPlacement(0, 1, 2 * PAGE, 2 * PAGE, 2 * PAGE)], PAGE, lay.num_virtual_blocks)
    m = BlockMapper(get_backend("host"), bp, lay, 8)
    for n in range(1, 5):                                           # one block a step, as decode grows
        m.apply(assigned={"a": lay.block_ids(1, 0, n)})
    phys = m.reservation.mapping()[bp.pages(lay.block_ids(1, 0, 4))]
    assert (np.diff(phys) == 1).all()                               # one pool run: one OS mapping
    m.check_integrity()
    m.close()


def test_mapper_eager_reclamation_returns_the_memory():
    lay = SlotLayout(2, 2)
    bp = BlockPages([TensorPlacement(0, 1, PAGE, PAGE, PAGE)], PAGE, lay.num_virtual_blocks)
    m = BlockMapper(get_backend("host"), bp, lay, 4, reclaim="eager")
    m.apply(assigned={"a": [1, 2]})
    assert m.pool.resident_bytes() == 3 * PAGE                      # the null block and a's two
    m.apply(removed=["a"])
    assert m.pool.resident_bytes() == PAGE
    m.check_integrity()
    m.close()


def test_integrity_check_sees_a_page_mapped_behind_its_back(mapper):
    m, lay, buf = mapper
    m.apply(assigned={"a": [1]})
    m.reservation.unmap(m.block_pages.pages([1])[:1])
    with pytest.raises(VmemIntegrityError):
        m.check_integrity()


# ---- state machine: scheduler-side slot table + worker-side mapper, as vLLM drives them --------------
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402


class SlotsAndPages(RuleBasedStateMachine):
    """Requests admitted, grown and finished at random. The table hands out slot-contiguous ids under
    the physical budget, the mapper maps them (deferred reclamation), and every live block keeps its
    data: each block's first byte holds its request's mark, written when the block was handed out."""

    SLOTS, PER_SLOT, PHYSICAL = 3, 4, 7

    @initialize()
    def setup(self):
        self.layout = SlotLayout(self.SLOTS, self.PER_SLOT)
        v = self.layout.num_virtual_blocks
        bp = BlockPages([TensorPlacement(0, 1, PAGE, PAGE, PAGE)], PAGE, v)
        self.table = SlotTable(self.layout, self.PHYSICAL)
        self.mapper = BlockMapper(get_backend("host"), bp, self.layout, self.PHYSICAL)
        self.view = self.mapper.reservation.tensor(torch.uint8, (v, PAGE))
        self.blocks = {}                 # request -> its block ids
        self.marks = {}
        self.next_id = 0

    def teardown(self):
        if hasattr(self, "mapper"):
            del self.view
            self.mapper.close()

    def _grow(self, req, n):
        slot = self.table.acquire(req)
        first = len(self.blocks.get(req, []))
        n = min(n, self.layout.blocks_per_slot - first, self.table.num_free_physical_blocks)
        if n <= 0:
            return
        self.table.take_blocks(slot, n)
        ids = self.layout.block_ids(slot, first, first + n)
        if first:
            self.mapper.apply(appended={req: ids})
        else:
            self.mapper.apply(assigned={req: ids})
        self.blocks.setdefault(req, []).extend(ids)
        for b in ids:
            self.view[b, 0] = self.marks[req]

    @precondition(lambda self: self.table.num_free_slots and self.table.num_free_physical_blocks)
    @rule(n=st.integers(1, 4))
    def admit(self, n):
        req = "r%d" % self.next_id
        self.next_id += 1
        self.marks[req] = 1 + self.next_id % 250
        self._grow(req, n)

    @precondition(lambda self: self.blocks)
    @rule(data=st.data(), n=st.integers(1, 2))
    def grow(self, data, n):
        self._grow(data.draw(st.sampled_from(sorted(self.blocks))), n)

    @precondition(lambda self: self.blocks)
    @rule(data=st.data())
    def finish(self, data):
        req = data.draw(st.sampled_from(sorted(self.blocks)))
        ids = self.blocks.pop(req)
        self.table.release(req)
        self.table.return_blocks(ids)
        self.mapper.apply(removed=[req])

    @invariant()
    def consistent(self):
        if not hasattr(self, "mapper"):
            return
        self.table.check()
        self.mapper.check_integrity()
        assert self.mapper.stats()["mapped_blocks"] <= self.PHYSICAL
        for req, ids in self.blocks.items():
            assert ids == self.layout.block_ids(self.table.slot_of_request(req), 0, len(ids))
            assert all(int(self.view[b, 0]) == self.marks[req] for b in ids)


TestSlotsAndPages = SlotsAndPages.TestCase


# ---- memory back to the OS, prefix-cache reclaim list, fail-loud checks (no vLLM) ----------------------
from types import SimpleNamespace  # noqa: E402

from vmem_vllm import ReclaimTracker, compat  # noqa: E402
from vmem_vllm.compat import VmemSeamError  # noqa: E402


def test_release_gives_idle_blocks_memory_back_to_the_os_and_keeps_live_ones():
    lay = SlotLayout(1, 6)
    page = 4 * PAGE
    bp = BlockPages([TensorPlacement(0, 1, page * 7, page, page)], PAGE, lay.num_virtual_blocks)
    m = BlockMapper(get_backend("host"), bp, lay, 6)
    view = m.reservation.tensor(torch.uint8, (7, page))
    base = m.pool.resident_bytes()                                   # the null block
    m.apply(assigned={"a": [1, 2, 3], "b": [4]})
    view[1:5].fill_(7)                                               # touch: the memfd gets the pages
    assert m.pool.resident_bytes() == base + 4 * page
    m.apply(removed=["a"])
    assert m.release([1, 2, 4, 5, 0]) == 2                           # 1, 2 idle; 4 live, 5 unmapped, 0 null
    assert m.pool.resident_bytes() == base + 2 * page                # 3 idle but not released, 4 live
    assert int(view[4, 0]) == 7 and not m.is_mapped(1)
    m.check_integrity()
    m.apply(assigned={"c": [1]})                                     # a released block maps again (zeros)
    assert int(view[1, 0]) == 0
    m.apply(removed=["b", "c"])
    assert m.release() == 3 and m.pool.resident_bytes() == base
    assert m.stats()["blocks_released"] == 5 and m.stats()["free_blocks"] == 6
    m.check_integrity()
    del view
    m.close()


def _pool(num_blocks):
    blocks = [SimpleNamespace(block_id=i, ref_cnt=0, block_hash=None) for i in range(num_blocks)]
    return SimpleNamespace(blocks=blocks, cached_block_hashes_by_block={})


def test_reclaim_tracker_reports_free_uncached_blocks_once_and_never_cached_or_held_ones():
    pool = _pool(6)
    t = ReclaimTracker(pool)
    pool.blocks[2].ref_cnt = 1                                       # held by a request again
    pool.blocks[3].block_hash = "h3"                                 # in the prefix cache
    pool.cached_block_hashes_by_block[4] = {"partial"}               # a partial-prefix entry
    t.note([0, 1, 2, 3, 4, 5, 5])
    assert t.take() == [1, 5]
    assert t.take() == [] and t.num_reported == 2
    pool.blocks[3].block_hash = None                                 # evicted: reclaimable now
    t.note([3])
    assert t.take() == [3]


def test_version_range_warns_outside(caplog):
    assert compat.check_version("0.32.0") and compat.check_version("0.33.0+cpu")
    with caplog.at_level("WARNING", logger="vmem_vllm.compat"):
        assert not compat.check_version("0.34.1")
        assert not compat.check_version("0.31.9")
        assert not compat.check_version("main")
    assert caplog.text.count("0.32.0 to 0.33.0") == 3


def _ours(fn):
    fn._vmem = True
    return fn


def _seams(**over):
    kw = dict(engine_core=SimpleNamespace(get_kv_cache_configs=_ours(lambda *a: None)),
              kv_cache_manager_cls=type("KVCacheManager", (), {"__init__": _ours(lambda self: None)}),
              worker_cls=type("Worker", (), {"execute_model": _ours(lambda self, so: None)}),
              allocate_users={compat.ALLOCATE_KV_CACHE_USERS[0]:
                              SimpleNamespace(allocate_kv_cache=_ours(lambda *a: None)),
                              compat.ALLOCATE_KV_CACHE_USERS[2]: None})
    kw.update(over)
    return kw


def test_check_patches_names_the_seam_and_the_version():
    compat.check_patches("0.32.0", **_seams())
    cases = {
        "kv_cache_configs": dict(engine_core=SimpleNamespace(get_kv_cache_configs=lambda *a: None)),
        "kv_cache_manager": dict(kv_cache_manager_cls=type("KVCacheManager", (), {"__init__": lambda self: None})),
        "execute_model": dict(worker_cls=type("Worker", (), {"execute_model": lambda self, so: None})),
        "allocate_kv_cache": dict(allocate_users={compat.ALLOCATE_KV_CACHE_USERS[0]: SimpleNamespace()}),
    }
    for seam, over in cases.items():
        with pytest.raises(VmemSeamError, match="seam %r .* vLLM 9.9.9" % seam) as err:
            compat.check_patches("9.9.9", **_seams(**over))
        assert err.value.seam == seam and err.value.vllm_version == "9.9.9"
    with pytest.raises(VmemSeamError, match="none of"):
        compat.check_patches("9.9.9", **_seams(allocate_users=dict.fromkeys(compat.ALLOCATE_KV_CACHE_USERS)))


def test_check_scheduler_worker_and_step():
    tagged, manager = SimpleNamespace(vmem_blocks=(8,)), SimpleNamespace(vmem_blocks=object())
    compat.check_scheduler("0.33.0", tagged, manager)
    with pytest.raises(VmemSeamError, match="kv_cache_configs"):
        compat.check_scheduler("0.33.0", SimpleNamespace(), manager)
    with pytest.raises(VmemSeamError, match="kv_cache_manager"):
        compat.check_scheduler("0.33.0", tagged, SimpleNamespace())

    inside, outside = torch.zeros(4), torch.zeros(4)
    res = [(inside.data_ptr(), 16)]
    Worker = type("Worker", (), {"execute_model": _ours(lambda self, so: None)})
    w = Worker()
    w.model_runner = SimpleNamespace(kv_caches=[inside])
    compat.check_worker("0.32.0", w, res)
    w.model_runner.kv_caches = [inside, outside]
    with pytest.raises(VmemSeamError, match="allocate_kv_cache.*outside every vmem reservation"):
        compat.check_worker("0.32.0", w, res)
    Sub = type("CPUWorker", (Worker,), {"execute_model": lambda self, so: None})     # overrides: no mapping
    s = Sub()
    s.model_runner = SimpleNamespace(kv_caches=[inside])
    with pytest.raises(VmemSeamError, match="execute_model.*CPUWorker overrides"):
        compat.check_worker("0.32.0", s, res)

    compat.check_step("0.32.0", SimpleNamespace(vmem_prepared=True))
    with pytest.raises(VmemSeamError, match="execute_model"):
        compat.check_step("0.32.0", SimpleNamespace())


def test_reclaim_tracker_caps_idle_cached_blocks_least_recently_freed_first():
    pool = _pool(8)
    evicted = []

    def evict(block):                                                # what vLLM's eviction does to a block
        evicted.append(block.block_id)
        block.block_hash = None
        return True

    t = ReclaimTracker(pool, max_cached_blocks=2, evict=evict)
    for b in (1, 2, 3, 4):
        pool.blocks[b].block_hash = "h%d" % b
    t.note_freed([pool.blocks[b] for b in (3, 1)])                   # freed first: 3, then 1
    t.note_freed([pool.blocks[5]])                                   # uncached: reclaimable at once
    assert t.take() == [5] and evicted == []
    pool.blocks[3].ref_cnt = 1                                       # a prefix hit takes 3 back
    t.note_freed([pool.blocks[b] for b in (2, 4)])
    assert t.take() == [1] and evicted == [1]                        # 1 was the oldest still cached
    assert t.num_capped == 1 and pool.blocks[2].block_hash == "h2"
    with pytest.raises(VmemInvalidArgument):
        ReclaimTracker(pool, max_cached_blocks=-1, evict=evict)
