"""fork(): objects made before a fork belong to the parent; in the child they refuse use.

Rationale: after ``os.fork()`` the child shares the parent's memfd pages (MAP_SHARED), so its writes
landed in the parent's cache; the async mapper's thread does not exist in the child, so waiting on or
closing it hung; a native lock held by another thread at fork time stays locked in the child forever.

Approach: every Reservation, PagePool, AsyncMapper and Backend records the fork generation it was made
in; ``os.register_at_fork`` bumps the generation in the child, and each object's ``_handle()`` then raises
VmemForkedError. The child hook also makes the child's copy of every host reservation inaccessible
(``vmem_host_forget_range``: a write through an inherited view faults instead of reaching the parent),
closes the child's copies of the pool memfds, and drops the shared backends so that ``get_backend``
in the child opens fresh ones: the child may build its own caches.

Implementation: destructors (``ffi.gc`` and ``close()``) of a stale object do nothing in the child: no
native call (its locks and its worker thread are the parent's). The child exits cleanly; what it
forgot stays the parent's. The hot path costs one integer compare; finalizers also compare the pid, for
a fork that did not run Python's at-fork hooks.

Limitations: a read through an inherited tensor view in the child faults too (SIGSEGV). A fork from C
that skips Python's at-fork hooks is caught only by the finalizers' pid check: use of a stale object
there is not refused. CUDA objects are refused the same way; CUDA itself does not survive a fork.
"""
from __future__ import annotations

import os
import weakref

from vmem._native import lib
from vmem.errors import VmemForkedError

_generation = 0
_host_ranges = weakref.WeakValueDictionary()   # id -> Reservation (host): remapped in the child
_pool_fds = weakref.WeakValueDictionary()      # id -> PagePool (host): memfd closed in the child
_child_hooks = []                              # callables run in the child after the above


def generation() -> int:
    return _generation


def current(gen: int) -> bool:
    """True when an object made in fork generation ``gen`` may be used in this process."""
    return gen == _generation


def refuse(obj, op: str):
    raise VmemForkedError(
        "%s: this %s was created before os.fork() and belongs to the parent process; a forked child "
        "must create its own (get_backend() in the child opens a fresh backend)" % (op, type(obj).__name__),
        op=op)


def guarded(destructor, gen: int):
    """``destructor`` for ffi.gc that does nothing in a forked child (no native call there)."""
    pid = os.getpid()

    def run(handle):
        if gen == _generation and os.getpid() == pid:
            destructor(handle)

    return run


def track_reservation(resv) -> None:
    """Until ``untrack``: a fork makes the child's copy of this host range inaccessible."""
    if resv.backend.name == "host":
        _host_ranges[id(resv)] = resv


def track_pool(pool, fd: int) -> None:
    """Until ``untrack``: a fork closes the child's copy of this memfd."""
    if fd >= 0:
        pool._fork_fd = fd
        _pool_fds[id(pool)] = pool


def untrack(obj) -> None:
    """``obj`` released its range / fd: the address or the number may be reused by anything else."""
    _host_ranges.pop(id(obj), None)
    _pool_fds.pop(id(obj), None)


def on_fork_child(hook) -> None:
    """Run ``hook()`` in every forked child (after the generation moved on)."""
    _child_hooks.append(hook)


def _after_fork_in_child() -> None:
    global _generation
    _generation += 1
    for resv in list(_host_ranges.values()):
        lib.vmem_host_forget_range(resv.address, resv.num_bytes)
    _host_ranges.clear()
    for pool in list(_pool_fds.values()):
        try:
            os.close(pool._fork_fd)
        except OSError:
            pass
    _pool_fds.clear()
    for hook in _child_hooks:
        hook()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["current", "generation", "guarded", "on_fork_child", "refuse", "track_pool", "track_reservation",
           "untrack"]
