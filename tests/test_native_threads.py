"""Thread safety: a mutex per reservation and per pool; concurrent callers never corrupt the tables."""
import threading

import numpy as np

from conftest import vmas_in


def _hammer(fn, num_threads=2):
    errors = []

    def run(k):
        try:
            fn(k)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_two_threads_map_disjoint_pages_of_one_reservation(host_backend):
    n = 256
    with host_backend.reserve(2 * n * 4096, 4096) as r, host_backend.create_pool(4096, 2 * n) as p:
        def work(k):
            virt = np.arange(k, 2 * n, 2)  # interleaved: every map/unmap touches the other's neighbours
            for rnd in range(20):
                for lo in range(0, n, 16):
                    r.map(virt[lo:lo + 16], p, virt[lo:lo + 16])
                if rnd != 19:
                    r.unmap(virt)

        _hammer(work)
        np.testing.assert_array_equal(r.mapping(), np.arange(2 * n))
        assert r.num_mappings == vmas_in(r) == 1
        assert p.info()["mappings"] == 2 * n


def test_two_reservations_share_one_pool(host_backend):
    with host_backend.create_pool(4096, 512) as p:
        rs = [host_backend.reserve(1 << 22, 4096) for _ in range(2)]

        def work(k):
            phys = np.arange(k * 256, (k + 1) * 256)
            for _ in range(30):
                rs[k].map(np.arange(256), p, phys)
                rs[k].unmap(np.arange(256))
            rs[k].map(np.arange(256), p, phys)

        _hammer(work)
        assert p.info()["mappings"] == 512 and p.info()["mapped_pages"] == 512
        for k, r in enumerate(rs):
            np.testing.assert_array_equal(r.mapping(0, 256), np.arange(k * 256, (k + 1) * 256))
            r.close()
        assert p.info()["mappings"] == 0


def test_budget_changes_while_other_threads_map(host_backend):
    """The mapping budget (map_budget, its OS part, the refresh clock) was read and written without a
    lock: set_map_budget, info() and the refresh inside a map raced (ThreadSanitizer: `make test-tsan`)."""
    before = host_backend.info()["mappings_used"]
    budget = host_backend.info()["map_budget"]
    try:
        with host_backend.reserve(1024 * 4096, 4096) as r, host_backend.create_pool(4096, 512) as p:
            mappers_left = [2]
            lock = threading.Lock()

            def work(k):
                if k == 0:
                    i = 0
                    while mappers_left[0]:                              # for as long as the others map
                        host_backend.set_map_budget(budget - (i % 2))   # near the OS budget: refreshes too
                        assert host_backend.info()["map_budget"] <= budget
                        i += 1
                else:
                    try:
                        virt = np.arange(k - 1, 1024, 4)                # 256 runs: one mapping each
                        for _ in range(30):
                            r.map(virt, p, np.arange(256) + 256 * (k - 1))
                            r.unmap(virt)
                    finally:
                        with lock:
                            mappers_left[0] -= 1

            _hammer(work, num_threads=3)
            assert r.mapped_pages == 0 and p.info()["mappings"] == 0
    finally:
        host_backend.set_map_budget(budget)
    assert host_backend.info()["mappings_used"] == before
