"""Elastic VirtualKVCache (allocator/elastic.py): caches and engines sharing one KV budget.

Host backend, real memfd pools charged to a real budget segment; several tenants in one process here
(tests/test_budget.py has the multi-process ones, bench/multi_tenant.py two engines in two processes).
"""
import time

import numpy as np
import pytest
import torch

from conftest import greedy_reference
from vmem.allocator import BudgetPolicy, KVCacheSpec, VirtualKVCache
from vmem.backends import Budget
from vmem.errors import VmemOutOfMemory

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16, max_batch=4, max_seq_len=512,
                   page_bytes=4096)
PAGE = SPEC.page_bytes
ROWS = SPEC.rows_per_slot                   # pages per column of a slot
TPP = SPEC.tokens_per_page


@pytest.fixture
def budget(tmp_path):
    return Budget(str(tmp_path / "kv"), 8 * ROWS * PAGE)      # 8 columns in all


def _cache(budget, **policy):
    return VirtualKVCache(SPEC, backend="host", budget=budget, budget_policy=BudgetPolicy(**policy))


def _snapshot(c):
    s = c.stats()
    return (s.mapped_pages, s.used_pages, s.reclaimable_pages, s.budget_held_pages, c.pool.resident_bytes(),
            c.reservation.mapping().tobytes())


def test_out_of_budget_changes_nothing_and_others_yield(budget):
    a, b = _cache(budget, idle_release_s=None), _cache(budget)
    sa = [a.alloc_slot(), a.alloc_slot()]
    a.step({sa[0]: 3 * TPP, sa[1]: 3 * TPP})                   # a holds 6 of 8 columns
    sb = b.alloc_slot()
    assert not b.can_allocate({sb: 3 * TPP})
    before = _snapshot(b)
    with pytest.raises(VmemOutOfMemory) as e:
        b.step({sb: 3 * TPP})
    assert e.value.needed_pages == 3 * ROWS and e.value.free_pages == 2 * ROWS
    assert _snapshot(b) == before
    b.check_integrity()
    assert b.stats().budget_waiting_pages == ROWS and a.stats().budget_others_waiting_pages == ROWS
    # a's pages are used: it has nothing to give, the scheduler would not wait for it
    a.maintain(force=True)
    assert a.stats().budget_held_pages == 6 * ROWS and not b.budget_reclaimable_elsewhere()
    # a finishes a request: its pages stay mapped for reuse (deferred) but are reclaimable now
    a.free_slot(sa[1])
    a.maintain(force=True)                                      # yields to b's recorded demand
    assert b.budget_reclaimable_elsewhere() or a.stats().budget_held_pages < 6 * ROWS
    assert a.stats().budget_held_pages == 5 * ROWS == a.pool.resident_bytes() // PAGE
    b.step({sb: 3 * TPP})
    assert b.stats().budget_held_pages == 3 * ROWS and b.stats().budget_total_held_pages == 8 * ROWS
    for c in (a, b):
        c.check_integrity()
    a.close()
    b.close()
    assert budget.info().held_bytes == 0 and budget.info().num_tenants == 0


def test_prefix_cached_pages_count_as_reclaimable_and_yield(budget):
    a, b = _cache(budget, idle_release_s=None), _cache(budget)
    ids = list(range(4 * TPP + 5))
    s = a.alloc_slot(token_ids=ids)
    a.step({s: len(ids)})                                      # 5 columns
    assert a.cache_prefix(s, ids) == 4 * TPP                   # 4 full columns enter the index
    a.free_slot(s)
    a.reclaim_idle()                                            # (frees the slot's pages, not only the index's)
    s = a.alloc_slot(token_ids=ids)
    a.step({s: len(ids)})
    a.cache_prefix(s, ids)
    a.free_slot(s)
    held = a.stats().budget_held_pages
    a.maintain(force=True)
    assert bd_reclaimable(budget) == held * PAGE                # slot pages and index columns, published
    t = b.alloc_slot()
    with pytest.raises(VmemOutOfMemory):
        b.step({t: 8 * TPP})                                   # records its demand
    a.maintain(force=True)                                     # gives slot pages, then index columns
    b.step({t: 8 * TPP})
    assert a.stats().budget_held_pages == 0
    a.check_integrity()
    b.check_integrity()
    a.close()
    b.close()


def bd_reclaimable(budget) -> int:
    return budget.info().reclaimable_bytes


def test_idle_cache_gives_everything_back_after_the_idle_period(budget):
    a = _cache(budget, idle_release_s=0.2, yield_to_waiters=False)
    s = a.alloc_slot()
    a.step({s: 4 * TPP})
    a.free_slot(s)
    assert a.maintain(force=True) == 0                         # idle, but not for long enough
    assert a.stats().budget_held_pages == 4 * ROWS
    time.sleep(0.25)
    assert a.maintain(force=True) == 4 * ROWS
    assert a.stats().budget_held_pages == 0 == a.pool.resident_bytes()
    a.check_integrity()
    s = a.alloc_slot()                                         # and grows again from nothing
    a.step({s: 2 * TPP})
    assert a.stats().budget_held_pages == 2 * ROWS
    a.check_integrity()
    a.close()


def test_short_budget_reclaims_own_idle_pages_before_charging(budget):
    a = _cache(budget, idle_release_s=None, max_bytes=4 * ROWS * PAGE)
    s = a.alloc_slot()
    a.step({s: 4 * TPP})
    a.free_slot(s)
    t = a.alloc_slot(num_tokens=TPP)
    u = a.alloc_slot()
    a.step({t: TPP, u: 3 * TPP})                               # at its cap: must reuse its idle pages
    assert a.stats().budget_held_pages == 4 * ROWS == a.stats().used_pages
    with pytest.raises(VmemOutOfMemory):
        a.step({t: 2 * TPP})
    a.check_integrity()
    a.close()


def _engine(budget, **kw):
    from vmem.engine.engine import build_engine

    return build_engine("tiny", "vmem", max_batch=4, max_seq_len=256, backend="host", page_bytes=4096,
                        budget=budget, **kw)


def test_engine_on_a_budget_decodes_like_the_oracle(tmp_path, model, one_thread):
    from vmem.engine.engine import Request, SamplingParams

    bd = Budget(str(tmp_path / "kv"), 64 << 20)
    eng = _engine(bd, budget_policy=BudgetPolicy(idle_release_s=0.0))
    prompts = [[5, 6, 7, 8] * 9, [100, 3, 9] * 5]
    for i, p in enumerate(prompts):
        eng.add_request(Request("r%d" % i, p, SamplingParams(max_tokens=6)))
    got = {}
    while eng.has_work():
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    for i, p in enumerate(prompts):
        assert got["r%d" % i] == greedy_reference(model, p, 6)
    assert eng.stats()["budget_peak_pages"] > 0
    eng.maintain()
    eng.cache.maintain(force=True)                             # idle: everything goes back
    assert eng.stats()["budget_held_pages"] == 0
    eng.close()
    assert bd.info().held_bytes == 0


def _contended(tmp_path, *, yield_to_waiters: bool, budget_wait_s: float):
    """An engine whose 3 requests need ~72 pages, next to another tenant holding 128 of the budget's 160
    pages; that tenant then goes idle (its pages reclaimable, not yet given back)."""
    from vmem.engine.engine import Request, SamplingParams

    bd = Budget(str(tmp_path / "kv"), 160 * 4096)
    other = VirtualKVCache(KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, max_batch=4, max_seq_len=512,
                                       page_bytes=4096), backend="host", budget=bd,
                           budget_policy=BudgetPolicy(idle_release_s=None, yield_to_waiters=yield_to_waiters))
    slots = [other.alloc_slot() for _ in range(4)]
    other.step({s: 512 for s in slots})
    assert other.stats().budget_held_pages == 128
    eng = _engine(bd, budget_policy=BudgetPolicy(idle_release_s=None))
    eng.scheduler.budget_wait_s = budget_wait_s
    for i in range(3):
        eng.add_request(Request("r%d" % i, [7] * 60, SamplingParams(max_tokens=120, ignore_eos=True)))
    for _ in range(5):
        eng.step()
    for s in slots:
        other.free_slot(s)
    other.maintain(force=True)                                 # (it may yield already, to a demand seen)
    assert other.stats().reclaimable_pages == other.stats().budget_held_pages > 64
    return bd, other, eng


def test_scheduler_waits_for_the_budget_instead_of_preempting(tmp_path, one_thread):
    bd, other, eng = _contended(tmp_path, yield_to_waiters=True, budget_wait_s=5.0)
    t0, demand_seen = time.monotonic(), False
    while eng.has_work() and time.monotonic() - t0 < 60:
        eng.step()
        demand_seen |= bd.info().waiting_bytes > 0
        other.maintain(force=True)                             # the other tenant sees the demand, yields
    assert not eng.has_work() and demand_seen
    assert eng.scheduler.num_budget_waits > 0 and eng.num_preemptions == 0
    assert other.stats().budget_held_pages < 128               # it gave pages back, no more than needed
    assert bd.info().held_bytes <= bd.info().limit_bytes
    eng.close()
    other.close()


def test_budget_wait_is_bounded_then_preempts(tmp_path, one_thread):
    bd, other, eng = _contended(tmp_path, yield_to_waiters=False, budget_wait_s=0.3)
    t0 = time.monotonic()
    while eng.num_preemptions == 0 and time.monotonic() - t0 < 30:
        eng.step()
        other.maintain(force=True)                             # reclaimable, but it never yields
    assert eng.num_preemptions > 0 and eng.scheduler.num_budget_waits > 0
    assert time.monotonic() - t0 >= 0.3
    eng.close()
    other.close()


def test_metrics_show_the_tenant_and_the_budget(tmp_path, one_thread):
    from vmem.cli import build_parser
    from vmem.server.app import _kv_budget
    from vmem.server.loop import ServerMetrics

    args = build_parser().parse_args(["serve", "--kv-budget", str(tmp_path / "kv"), "--memory", "4M",
                                      "--kv-budget-min", "64K"])
    kwargs = _kv_budget(args)
    assert kwargs["budget"].limit_bytes == 4 << 20 and kwargs["budget_policy"].min_bytes == 64 << 10
    eng = _engine(kwargs["budget"], budget_policy=kwargs["budget_policy"])
    second = _engine(_kv_budget(build_parser().parse_args(["serve", "--kv-budget", str(tmp_path / "kv")]))["budget"])
    s = eng.cache.alloc_slot()
    eng.cache.step({s: 100})
    t = second.cache.alloc_slot()
    second.cache.step({t: 200})

    class Loop:
        stats = eng.stats()
        num_running, num_queued, num_steps, alive = 0, 0, 0, True

    text = ServerMetrics().render(Loop())
    held, total = eng.stats()["budget_held_pages"], second.stats()["budget_total_held_pages"]
    assert held > 0 and total > held
    assert "vmem_kv_budget_held_pages %d" % held in text
    assert "vmem_kv_budget_total_held_pages %d" % total in text
    assert "vmem_kv_budget_limit_pages %d" % ((4 << 20) // 4096) in text
    eng.close()
    second.close()
    assert np.isclose(kwargs["budget"].info().held_bytes, 0)
