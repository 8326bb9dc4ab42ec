"""AsyncMapper: map / unmap batches on a native worker thread (Note [Async mapper] in worker.c).

``submit`` copies the page arrays into C memory and returns a ticket at once; ``wait(ticket)`` blocks
(without the GIL) until the batch ran and raises exactly what ``Reservation.map`` would have raised
(the batch is rolled back in the worker). The worker touches no Python object.
"""
from __future__ import annotations

import operator
import threading

from vmem._native import as_pages, ffi, lib
from vmem.backends import _fork
from vmem.backends._handle import refuse_copy
from vmem.backends.base import _i64
from vmem.errors import INVALID, VmemClosedError, VmemInvalidArgument, check, check_err


def _ticket(ticket, op: str) -> int:
    """A ticket as an int: a float or a string would be claimed and then refused by cffi (ticket lost)."""
    if isinstance(ticket, bool):
        ticket = None
    try:
        value = operator.index(ticket)
    except TypeError:
        raise VmemInvalidArgument("%s(%r): a ticket is the int submit() returned" % (op, ticket), op=op) from None
    if not 0 < value < 2**64:
        raise VmemInvalidArgument("%s(%d): unknown ticket" % (op, value), op=op)
    return value


class AsyncMapper:
    """One native worker thread with a FIFO of map/unmap jobs. Close it (or use ``with``).

    Threads: any thread may submit, and several may wait at once, each on its own tickets (a ticket is
    waited once). Copy and pickle are refused (VmemInvalidArgument): a copy would share the worker.
    fork(): a child refuses an inherited mapper (VmemForkedError) and its close() joins nothing.
    """

    __reduce_ex__ = refuse_copy

    def __init__(self, backend):
        out = ffi.new("vmem_worker_t **")
        check(lib.vmem_worker_create(out), "async_mapper")
        self._gen = _fork.generation()
        self._h = out[0]
        self.backend = backend
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when the last native call in flight ends
        self._users = 0   # native calls in flight on other threads: close() waits for them (it frees the worker)
        self._jobs = {}  # ticket -> (op, reservation, pool, num_pages): keeps them alive until waited

    def _enter(self, op):
        """The native handle, counted as in use until ``_leave()``; VmemClosedError after close()."""
        if not _fork.current(self._gen):
            _fork.refuse(self, op)
        with self._lock:
            if self._h is None:
                raise VmemClosedError("%s: async mapper is closed" % op, op=op)
            self._users += 1
            return self._h

    def _leave(self):
        with self._lock:
            self._users -= 1
            if not self._users:
                self._idle.notify_all()

    def submit(self, reservation, virt_pages, pool, phys_pages) -> int:
        """Queue ``reservation.map(virt_pages, pool, phys_pages)``; returns a ticket at once."""
        virt = as_pages(virt_pages, "virt_pages")
        phys = as_pages(phys_pages, "phys_pages")
        if virt.size != phys.size:
            check(INVALID, "submit", num_virt=virt.size, num_phys=phys.size)
        ticket = ffi.new("uint64_t *")
        resv_h, pool_h = reservation._handle("submit"), pool._handle("submit")
        h = self._enter("submit")
        try:
            rc = lib.vmem_worker_submit_map(h, resv_h, pool_h, _i64(virt), _i64(phys), virt.size, ticket)
        finally:
            self._leave()
        check(rc, "submit", num_pages=virt.size)
        with self._lock:
            self._jobs[int(ticket[0])] = ("map", reservation, pool, virt.size)
        return int(ticket[0])

    def submit_unmap(self, reservation, virt_pages) -> int:
        """Queue ``reservation.unmap(virt_pages)``; returns a ticket at once."""
        virt = as_pages(virt_pages, "virt_pages")
        ticket = ffi.new("uint64_t *")
        resv_h = reservation._handle("submit_unmap")
        h = self._enter("submit_unmap")
        try:
            rc = lib.vmem_worker_submit_unmap(h, resv_h, _i64(virt), virt.size, ticket)
        finally:
            self._leave()
        check(rc, "submit_unmap", num_pages=virt.size)
        with self._lock:
            self._jobs[int(ticket[0])] = ("unmap", reservation, None, virt.size)
        return int(ticket[0])

    def done(self, ticket: int) -> bool:
        """True when ``wait(ticket)`` would not block."""
        ticket = _ticket(ticket, "done")
        h = self._enter("done")
        try:
            return lib.vmem_worker_poll(h, ticket) == 1
        finally:
            self._leave()

    def wait(self, ticket: int) -> None:
        """Block until the job ran; raise like Reservation.map/unmap if it failed (it was rolled back)."""
        ticket = _ticket(ticket, "wait")
        h = self._enter("wait")
        try:
            with self._lock:  # claim the ticket first: the native wait frees the job, so only one may wait
                job = self._jobs.pop(ticket, None)
            if job is None:
                raise VmemInvalidArgument("wait(%r): unknown ticket, or already waited" % (ticket,), op="wait")
            op, _resv, _pool, n = job
            err = ffi.new("vmem_err_t *")
            rc = lib.vmem_worker_wait(h, ticket, err)
        finally:
            self._leave()
        if rc:
            check_err(rc, op, err, num_pages=n, ticket=ticket, needed_pages=n)

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        h = self._enter("pending")
        try:
            return int(lib.vmem_worker_pending(h))
        finally:
            self._leave()

    def close(self) -> None:
        """Let queued jobs run, then join the thread. Unwaited tickets are dropped.

        Safe while another thread waits: that wait returns first (the native close frees the worker).
        In a forked child it only forgets the worker: its thread is the parent's, so nothing is joined.
        """
        if not _fork.current(self._gen):
            self._h = None
            self._jobs = {}
            return
        with self._lock:
            if self._h is None:
                return
            h, self._h = self._h, None
            while self._users:
                self._idle.wait()
        lib.vmem_worker_close(h)
        self._jobs.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
