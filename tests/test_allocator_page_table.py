"""Page table (reference counts) and physical placement (contiguous extents)."""

import numpy as np
import pytest

from vmem.allocator.page_table import PageTable, place_pages
from vmem.errors import VmemInvalidArgument


def test_reference_counts_follow_mappings():
    t = PageTable(num_virtual_pages=10, num_pool_pages=4)
    t.set(np.array([0, 1]), np.array([2, 3]))
    t.set(np.array([5]), np.array([2]))              # page 2 shared by virtual pages 0 and 5 (a prefix)
    assert t.refcount.tolist() == [0, 0, 2, 1]
    assert t.num_used == 2 and t.num_free == 2 and t.num_mapped_virtual == 3
    assert t.check() == []
    assert t.clear(np.array([0])).tolist() == []     # still mapped at 5
    assert t.clear(np.array([5, 1])).tolist() == [2, 3]
    assert t.num_used == 0 and t.check() == []
    with pytest.raises(VmemInvalidArgument):
        t.clear(np.array([1]))
    t.set(np.array([4]), np.array([0]))
    with pytest.raises(VmemInvalidArgument):
        t.set(np.array([4]), np.array([1]))


def test_check_finds_corruption():
    t = PageTable(8, 4)
    t.set(np.array([0, 1]), np.array([0, 1]))
    t.refcount[1] = 2
    assert any("reference counts" in p for p in t.check())


def test_expected_mappings_counts_merged_runs():
    t = PageTable(16, 16)
    t.set(np.arange(0, 4), np.arange(8, 12))         # one run
    t.set(np.arange(4, 6), np.array([3, 4]))         # adjacent virtually, not physically: a second run
    t.set(np.array([10]), np.array([0]))             # isolated
    # host: the 3 runs plus the unmapped gaps [6, 10) and [11, 16) of the reservation
    assert t.expected_mappings(coalesce_phys=True) == 5
    # cuda: mapped runs only, physical contiguity does not matter
    assert t.expected_mappings(coalesce_phys=False) == 2


def test_rows_extend_their_own_extent():
    free = np.ones(64, dtype=bool)
    first = place_pages(free, np.array([-1, -1, -1]), np.array([2, 2, 2]))
    rows = first.reshape(3, 2)
    assert np.all(np.diff(rows, axis=1) == 1)        # each row's pages are consecutive
    assert len(np.unique(first)) == 6 and not free[first].any()
    # growing each row by 3 continues right after its last page: all rows stay one extent
    more = place_pages(free, rows[:, -1], np.array([3, 3, 3])).reshape(3, 3)
    assert np.array_equal(more[:, 0], rows[:, -1] + 1)
    assert np.all(np.diff(more, axis=1) == 1)


def test_new_extents_leave_room_to_grow():
    """Interleaved one-page growth of many rows keeps most rows in few extents."""
    free = np.ones(4096, dtype=bool)
    num_rows = 32
    lasts = np.full(num_rows, -1)
    extents = np.zeros(num_rows, dtype=int)
    for _ in range(64):
        pages = place_pages(free, lasts, np.ones(num_rows, dtype=np.int64))
        extents += pages != lasts + 1
        lasts = pages
    assert free.sum() == 4096 - 64 * num_rows
    assert extents.mean() <= 3, extents


def test_placement_uses_every_free_page_when_fragmented():
    free = np.zeros(20, dtype=bool)
    free[[1, 3, 5, 7, 9, 11]] = True
    got = place_pages(free, np.array([0, -1]), np.array([4, 2]))
    assert sorted(got.tolist()) == [1, 3, 5, 7, 9, 11]
    assert got[0] == 1                                # row 0 continued after its page 0
    assert not free.any()


def test_rows_ending_on_the_same_page_do_not_both_continue_onto_its_neighbour():
    """Two rows sharing their last pool page (a shared prefix): only one may extend in place."""
    free = np.ones(16, dtype=bool)
    free[:3] = False
    chosen = place_pages(free, np.array([2, 2]), np.array([2, 2]))
    assert len(set(chosen.tolist())) == 4
    assert chosen[:2].tolist() == [3, 4]
    assert not free[chosen].any()
