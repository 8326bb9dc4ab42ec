"""The shared KV budget (Note [Shared KV budget] in vmem/_native/budget.c) with real processes.

Tenants are separate Python processes over the host backend: elastic memfd pools charged to one
budget segment under /dev/shm (or the test's tmp dir). What the OS says (the memfds' allocated blocks,
read through /proc/PID/fd while every tenant is stopped, so the sum is one instant) is checked against
the limit as well as what the budget says. Every wait in here has a timeout.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from vmem.backends import Budget, get_backend
from vmem.errors import VmemBusyError, VmemClosedError, VmemForkedError, VmemInvalidArgument, VmemOutOfMemory

PAGE = 64 << 10


@pytest.fixture
def seg(tmp_path):
    return str(tmp_path / "budget")


def _spawn(code: str, *args, env=None):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})))


def _read_line(proc, timeout_s=30.0) -> str:
    """One stdout line of a child, or fail (no unbounded wait)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout_s):
        proc.kill()
        raise AssertionError("child %d said nothing in %.0f s: %s" % (proc.pid, timeout_s, proc.stderr.read()[-2000:]))
    line = proc.stdout.readline()
    assert line, "child %d exited: %s" % (proc.pid, proc.stderr.read()[-2000:])
    return line.strip()


def _memfd_bytes(pid: int) -> int:
    """Allocated bytes (st_blocks * 512) of every vmem memfd the process holds, read through /proc/PID/fd."""
    total = 0
    fd_dir = "/proc/%d/fd" % pid
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, fd)).startswith("/memfd:vmem-pool"):
                total += os.stat(os.path.join(fd_dir, fd)).st_blocks * 512
        except FileNotFoundError:
            pass
    return total


# ---------------------------------------------------------------- one process

def test_elastic_pool_charges_on_map_and_gives_back_on_trim(seg):
    b = get_backend("host")
    with Budget(seg, 8 * PAGE) as bd:
        lease = bd.lease("t")
        pool = b.create_pool(PAGE, 64, lease=lease)
        r = b.reserve(64 * PAGE, PAGE)
        assert pool.info()["charged_pages"] == 0 and pool.resident_bytes() == 0
        r.map([0, 1, 2], pool, [5, 6, 7])
        r.map([10], pool, [5])                      # an alias costs nothing more
        assert lease.info().held_bytes == 3 * PAGE == pool.resident_bytes()
        # a failed map (the 2nd OS op) gives its charge back with its rollback
        r.inject_fault(2)
        with pytest.raises(Exception):
            r.map([20, 30], pool, [20, 30])
        assert lease.info().held_bytes == 3 * PAGE == pool.resident_bytes()
        # out of budget: nothing changes, the shortfall is waiting demand
        with pytest.raises(VmemOutOfMemory) as e:
            r.map(np.arange(40, 46), pool, np.arange(40, 46))
        assert e.value.needed_pages == 6 and e.value.free_pages == 5
        assert (r.mapping(40, 6) == -1).all() and pool.info()["charged_pages"] == 3
        assert lease.info().waiting_bytes == PAGE and bd.info().waiting_bytes == PAGE
        r.map(np.arange(40, 45), pool, np.arange(40, 45))
        assert lease.info().waiting_bytes == 0 and bd.info().held_bytes == 8 * PAGE
        # unmapped but not trimmed: still memory, still charged; trim gives it back
        r.unmap([0, 1, 2, 10])
        assert lease.info().held_bytes == 8 * PAGE
        pool.trim([5, 6, 7])
        assert lease.info().held_bytes == 5 * PAGE == pool.resident_bytes()
        assert lease.info().peak_bytes == 8 * PAGE
        r.close()
        pool.close()                                # the last reference gives back every charge
        assert lease.info().held_bytes == 0 and bd.info().held_bytes == 0
        lease.close()
        assert bd.info().num_tenants == 0


def test_budget_minimum_maximum_and_bad_input(seg, tmp_path):
    with Budget(seg, 10 * PAGE) as bd:
        a = bd.lease("a", min_bytes=4 * PAGE)
        with pytest.raises(VmemOutOfMemory):            # 4 reserved for a: 6 left
            bd.lease("too-big", min_bytes=7 * PAGE)
        c = bd.lease("c", max_bytes=3 * PAGE)
        with pytest.raises(VmemOutOfMemory):
            c.take(4 * PAGE)                            # over its maximum
        c.take(3 * PAGE)
        o = bd.lease("o")
        o.take(3 * PAGE)
        with pytest.raises(VmemOutOfMemory):            # a's unmet minimum is not for others
            o.take(PAGE)
        a.take(4 * PAGE)                                # ... it is a's
        with pytest.raises(VmemBusyError):              # a limit below what is held
            bd.set_limit(9 * PAGE)
        assert bd.limit_bytes == 10 * PAGE
        bd.set_limit(10 * PAGE)
        with pytest.raises(VmemInvalidArgument):
            bd.lease("x", min_bytes=3, max_bytes=2)
        with pytest.raises(VmemInvalidArgument):
            a.take(-1)
        with pytest.raises(VmemInvalidArgument):
            bd.set_limit(0)
        with pytest.raises(VmemOutOfMemory):            # every wait has a timeout
            t0 = time.monotonic()
            o.wait(PAGE, timeout_s=0.2)
        assert 0.15 < time.monotonic() - t0 < 5
        o.close()
        with pytest.raises(VmemClosedError):
            o.take(1)
    # bad segments are typed errors: missing, wrong size, right size but foreign, another version
    with pytest.raises(VmemInvalidArgument, match="no such budget"):
        Budget(str(tmp_path / "missing"))
    size = os.path.getsize(seg)
    for name, data in [("short", b"x" * 100), ("foreign", b"\x01" * size)]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(VmemInvalidArgument, match="not a vmem budget"):
            Budget(str(tmp_path / name), 10 * PAGE)
    raw = bytearray(open(seg, "rb").read())
    raw[8] ^= 0x7f                                      # version
    (tmp_path / "version").write_bytes(bytes(raw))
    with pytest.raises(VmemInvalidArgument, match="not a vmem budget"):
        Budget(str(tmp_path / "version"))


# ---------------------------------------------------------------- several processes

TENANT = """
import os, sys, time, random
import numpy as np
from vmem.backends import Budget, get_backend
from vmem.errors import VmemOutOfMemory
path, seconds, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
PAGE = 64 << 10
b = get_backend("host")
bd = Budget(path)
lease = bd.lease("t%d" % seed)
pool = b.create_pool(PAGE, 256, lease=lease)
r = b.reserve(256 * PAGE, PAGE)
rng = random.Random(seed)
mapped = []
refused = 0
print("READY", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    if rng.random() < 0.55:                      # grow by a random run
        free = [p for p in range(256) if p not in set(mapped)]
        n = rng.randint(1, 12)
        pages = rng.sample(free, min(n, len(free)))
        try:
            r.map(pages, pool, pages)
            mapped += pages
        except VmemOutOfMemory:
            refused += 1
    elif mapped:                                 # shrink: unmap and trim a random subset
        k = rng.randint(1, len(mapped))
        rng.shuffle(mapped)
        gone, mapped = mapped[:k], mapped[k:]
        r.unmap(gone)
        pool.trim(gone)
    time.sleep(rng.random() * 0.002)
assert pool.info()["charged_pages"] == len(mapped) == pool.resident_bytes() // PAGE
print("DONE %d %d" % (refused, len(mapped)), flush=True)
"""


def test_processes_growing_and_shrinking_never_exceed_the_limit(seg):
    limit_pages = 40
    bd = Budget(seg, limit_pages * PAGE)
    procs = [_spawn(TENANT, seg, 3.0, seed) for seed in range(4)]
    try:
        for p in procs:
            assert _read_line(p) == "READY"
        samples = over = 0
        peak = 0
        while any(p.poll() is None for p in procs) and samples < 400:
            live = [p for p in procs if p.poll() is None]
            for p in live:                          # one instant: every tenant stopped while we read
                os.kill(p.pid, signal.SIGSTOP)
            try:
                os_bytes = sum(_memfd_bytes(p.pid) for p in live)
            except (FileNotFoundError, ProcessLookupError):
                os_bytes = 0                        # a tenant finished between poll and kill
            finally:
                for p in live:
                    os.kill(p.pid, signal.SIGCONT)
            held = bd.info().held_bytes
            over += os_bytes > limit_pages * PAGE or held > limit_pages * PAGE
            peak = max(peak, os_bytes)
            samples += 1
            time.sleep(0.005)
        refused = 0
        for p in procs:
            line = _read_line(p)
            assert line.startswith("DONE"), line
            refused += int(line.split()[1])
            assert p.wait(timeout=30) == 0, p.stderr.read()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert samples >= 20 and over == 0
    assert peak > limit_pages * PAGE // 2        # the tenants really pushed against the limit
    assert refused > 0
    assert bd.info().held_bytes == 0 and bd.info().num_tenants == 0


HOG = """
import sys, time
import numpy as np
from vmem.backends import Budget, get_backend
path, pages, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
PAGE = 64 << 10
b = get_backend("host")
bd = Budget(path)
lease = bd.lease("hog")
pool = b.create_pool(PAGE, pages, lease=lease)
r = b.reserve(pages * PAGE, PAGE)
r.map(np.arange(pages), pool, np.arange(pages))
if mode == "lock":
    from vmem._native import lib
    lib.vmem_budget_debug_lock(bd._h)          # die (or sleep) holding the segment's lock
print("READY", flush=True)
time.sleep(60)
"""


def test_sigkilled_tenant_pages_return_within_bounded_time(seg):
    bd = Budget(seg, 20 * PAGE)
    me = bd.lease("me")
    hog = _spawn(HOG, seg, 18, "hold")
    try:
        assert _read_line(hog) == "READY"
        assert bd.info().held_bytes == 18 * PAGE and _memfd_bytes(hog.pid) == 18 * PAGE
        with pytest.raises(VmemOutOfMemory):
            me.take(10 * PAGE)
        os.kill(hog.pid, signal.SIGKILL)           # not reaped yet: a zombie counts as dead
        t0 = time.monotonic()
        me.wait(10 * PAGE, timeout_s=5.0)
        assert time.monotonic() - t0 < 1.0
    finally:
        hog.kill()
        hog.wait(timeout=10)
    info = bd.info()
    assert info.recovered_leases == 1 and info.recovered_bytes == 18 * PAGE
    assert info.held_bytes == 10 * PAGE and info.num_tenants == 1


def test_tenant_dying_inside_the_lock_is_repaired_and_a_stuck_holder_times_out(seg, monkeypatch):
    bd = Budget(seg, 20 * PAGE)
    me = bd.lease("me")
    monkeypatch.setenv("VMEM_BUDGET_LOCK_MS", "300")
    hog = _spawn(HOG, seg, 4, "lock")
    try:
        assert _read_line(hog) == "READY"
        os.kill(hog.pid, signal.SIGSTOP)           # alive, holding the lock: a bounded wait, then BUSY
        t0 = time.monotonic()
        with pytest.raises(VmemBusyError, match="lock"):
            me.take(PAGE)
        assert 0.2 < time.monotonic() - t0 < 5
        os.kill(hog.pid, signal.SIGKILL)           # dead holding it: EOWNERDEAD, repaired by the next locker
        hog.wait(timeout=10)
        me.take(16 * PAGE)
    finally:
        if hog.poll() is None:
            hog.kill()
            hog.wait(timeout=10)
    info = bd.info()
    assert info.recovered_leases == 1 and info.held_bytes == 16 * PAGE


GREEDY = """
import sys, time
from vmem.backends import Budget
from vmem.errors import VmemOutOfMemory
path, seconds = sys.argv[1], float(sys.argv[2])
PAGE = 64 << 10
lease = Budget(path).lease("greedy")
print("READY", flush=True)
end = time.monotonic() + seconds
taken = 0
while time.monotonic() < end:
    try:
        lease.take(PAGE)
        taken += 1
    except VmemOutOfMemory:
        if taken:
            lease.give(PAGE)                    # churn: give one back, take again
            taken -= 1
print("DONE %d" % taken, flush=True)
"""


def test_guaranteed_minimum_is_honoured_under_contention(seg):
    bd = Budget(seg, 32 * PAGE)
    guaranteed = bd.lease("guaranteed", min_bytes=12 * PAGE)
    greedy = [_spawn(GREEDY, seg, 2.0) for _ in range(3)]
    try:
        for p in greedy:
            assert _read_line(p) == "READY"
        time.sleep(0.3)                             # the greedy ones now fill everything else
        assert bd.info().held_bytes >= 16 * PAGE
        for _ in range(12):                         # every one of the minimum's pages, one by one
            guaranteed.take(PAGE)
        with pytest.raises(VmemOutOfMemory):        # and not more than is free
            guaranteed.take(20 * PAGE)
        for p in greedy:
            assert _read_line(p).startswith("DONE")
            assert p.wait(timeout=30) == 0
    finally:
        for p in greedy:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert guaranteed.info().held_bytes == 12 * PAGE


def test_lease_is_refused_in_a_forked_child(seg):
    bd = Budget(seg, 8 * PAGE)
    lease = bd.lease("parent")
    lease.take(PAGE)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            lease.take(PAGE)
        except VmemForkedError:             # the backends' fork rule, as for pools and reservations
            code = 7
        os.write(w, json.dumps(code).encode())
        os._exit(0)
    os.close(w)
    try:
        got = json.loads(os.read(r, 100))
    finally:
        os.waitpid(pid, 0)
        os.close(r)
    assert got == 7 and lease.info().held_bytes == PAGE
