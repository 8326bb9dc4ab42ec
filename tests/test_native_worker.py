"""The native async mapper: tickets, ordering, failures rolled back in the worker, close."""
import time

import numpy as np
import pytest
import torch

from vmem.errors import VmemClosedError, VmemDriverError, VmemInvalidArgument


def test_submit_returns_ticket_and_wait_maps(host_backend, host_resv, host_pool):
    with host_backend.async_mapper() as m:
        t1 = m.submit(host_resv, np.arange(8), host_pool, np.arange(8))
        t2 = m.submit(host_resv, [100, 101], host_pool, [50, 51])
        assert t2 > t1
        m.wait(t2)
        m.wait(t1)
        assert m.pending == 0
    np.testing.assert_array_equal(host_resv.mapping(0, 8), np.arange(8))
    assert host_resv.mapping(100, 2).tolist() == [50, 51]
    host_resv.tensor(torch.uint8, (8 * host_resv.page_bytes,)).fill_(1)  # really writable


def test_jobs_run_in_order_map_then_unmap(host_backend, host_resv, host_pool):
    with host_backend.async_mapper() as m:
        tickets = []
        for i in range(20):
            tickets.append(m.submit(host_resv, [i], host_pool, [i]))
            if i % 2:
                tickets.append(m.submit_unmap(host_resv, [i]))
        for t in tickets:
            m.wait(t)
    expected = np.full(20, -1)
    expected[::2] = np.arange(0, 20, 2)
    np.testing.assert_array_equal(host_resv.mapping(0, 20), expected)


def test_failure_is_rolled_back_in_worker(host_backend, host_resv, host_pool):
    host_resv.inject_fault(3)
    with host_backend.async_mapper() as m:
        bad = m.submit(host_resv, np.arange(0, 20, 2), host_pool, np.arange(10))
        with pytest.raises(VmemDriverError):
            m.wait(bad)
        assert (host_resv.mapping() == -1).all() and host_pool.info()["mappings"] == 0
        dup = m.submit(host_resv, [1, 1], host_pool, [0, 1])
        with pytest.raises(VmemInvalidArgument, match="twice"):
            m.wait(dup)
        ok = m.submit(host_resv, [5], host_pool, [5])
        m.wait(ok)
    assert host_resv.mapped_pages == 1


def test_unknown_ticket_and_use_after_close(host_backend, host_resv, host_pool):
    m = host_backend.async_mapper()
    with pytest.raises(VmemInvalidArgument):
        m.wait(12345)
    t = m.submit(host_resv, [0], host_pool, [0])
    m.close()  # drains the queue
    assert host_resv.mapped_pages == 1
    with pytest.raises(VmemClosedError):
        m.submit(host_resv, [1], host_pool, [1])
    with pytest.raises(VmemClosedError):
        m.wait(t)


def test_reservation_closed_while_queued(host_backend, host_pool):
    r = host_backend.reserve(1 << 24, 1 << 16)
    with host_backend.async_mapper() as m:
        tickets = [m.submit(r, [i], host_pool, [i]) for i in range(50)]
        r.close()
        outcomes = []
        for t in tickets:
            try:
                m.wait(t)
                outcomes.append("ok")
            except VmemClosedError:
                outcomes.append("closed")
    # jobs before the close ran, those after it found the reservation closed; nothing leaked
    assert outcomes == sorted(outcomes, key=lambda o: o != "ok")
    assert host_pool.info()["mappings"] == 0


def test_done_polls_without_blocking(host_backend, host_resv, host_pool):
    with host_backend.async_mapper() as m:
        t = m.submit(host_resv, np.arange(64), host_pool, np.arange(64))
        m.wait(m.submit(host_resv, [200], host_pool, [200]))
        assert m.done(t)  # FIFO: the later job finished, so the earlier one did
        m.wait(t)


def test_a_ticket_is_waited_once(host_backend, host_resv, host_pool):
    with host_backend.async_mapper() as m:
        t = m.submit(host_resv, [3], host_pool, [3])
        m.wait(t)
        with pytest.raises(VmemInvalidArgument, match="already waited"):
            m.wait(t)


def test_pool_closed_while_a_job_maps_gives_closed_not_a_driver_error(host_backend):
    """PagePool.close() promises queued jobs are safe: a job already past its checks used to mmap the
    memfd after close() had closed it (EBADF: VmemDriverError, or another file had the fd number)."""
    pb = 4096
    outcomes = set()
    for i in range(30):
        r = host_backend.reserve(8192 * pb, pb)
        p = host_backend.create_pool(pb, 4096)
        with host_backend.async_mapper() as m:
            virt = np.arange(0, 8192, 2)          # 4096 runs: one mmap each, a long window
            ticket = m.submit(r, virt, p, np.arange(4096))
            time.sleep(0.0002 * (i % 10))         # close before, while and after the job runs
            p.close()
            try:
                m.wait(ticket)
                outcomes.add("ok")
            except VmemClosedError:
                outcomes.add("closed")
                assert r.mapped_pages == 0     # rolled back
        mapped = r.mapping()
        assert (mapped >= 0).sum() == r.mapped_pages
        r.close()
    assert outcomes <= {"ok", "closed"}, outcomes


def test_close_while_another_thread_waits_does_not_crash():
    """close() freed the native worker under a thread blocked in wait() (double free, abort). Run in a
    subprocess: the bug kills the interpreter."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import threading, time
        import numpy as np
        from vmem.backends import get_backend
        from vmem.errors import VmemClosedError
        b = get_backend("host")
        for i in range(40):
            r = b.reserve(8192 * 4096, 4096); p = b.create_pool(4096, 4096)
            m = b.async_mapper()
            t = m.submit(r, np.arange(0, 8192, 2), p, np.arange(4096))
            out = []
            th = threading.Thread(target=lambda: out.append(m.wait(t)))
            th.start()
            time.sleep(0.0005 * (i % 4))
            m.close()
            th.join()
            try:
                m.wait(t)
            except VmemClosedError:
                pass
            r.close(); p.close()
        print("done")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]


def test_two_threads_each_waiting_on_their_own_ticket_do_not_crash():
    """wait() found its job's predecessor before blocking and unlinked through it after: when another
    thread's wait freed that predecessor meanwhile, the write hit freed memory (segfault; ASan names
    worker.c). Run in a subprocess: the bug kills the interpreter."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import threading
        import numpy as np
        from vmem.backends import get_backend
        b = get_backend("host")
        r = b.reserve(8192 * 4096, 4096); p = b.create_pool(4096, 8192)
        with b.async_mapper() as m:
            for i in range(200):
                # the first job is slow (4096 runs), the second fast: the second waiter blocks on a job
                # whose predecessor the first waiter frees
                t1 = m.submit(r, np.arange(0, 8192, 2), p, np.arange(4096))
                t2 = m.submit(r, [1], p, [5000])
                t3 = m.submit_unmap(r, [1])
                errors = []
                def wait(t):
                    try:
                        m.wait(t)
                    except BaseException as e:
                        errors.append(e)
                ths = [threading.Thread(target=wait, args=(t,)) for t in (t3, t1)]
                for th in ths: th.start()
                wait(t2)
                for th in ths: th.join()
                assert not errors, errors
                r.unmap(np.arange(0, 8192, 2))
        r.close(); p.close()
        print("done")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "done" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
