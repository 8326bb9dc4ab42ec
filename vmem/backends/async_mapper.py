"""AsyncMapper: map / unmap batches on a native worker thread (Note [Async mapper] in worker.c).

``submit`` copies the page arrays into C memory and returns a ticket at once; ``wait(ticket)`` blocks
(without the GIL) until the batch ran and raises exactly what ``Reservation.map`` would have raised
(the batch is rolled back in the worker). The worker touches no Python object.
"""
from __future__ import annotations

import threading

from vmem.backends._ffi import as_pages, ffi, lib
from vmem.backends.base import _i64
from vmem.errors import INVALID, VmemClosedError, VmemInvalidArgument, check, check_err


class AsyncMapper:
    """One native worker thread with a FIFO of map/unmap jobs. Close it (or use ``with``)."""

    def __init__(self, backend):
        out = ffi.new("vmem_worker_t **")
        check(lib.vmem_worker_create(out), "async_mapper")
        self._h = out[0]
        self.backend = backend
        self._lock = threading.Lock()
        self._jobs = {}  # ticket -> (op, reservation, pool, num_pages): keeps them alive until waited

    def _handle(self, op):
        if self._h is None:
            raise VmemClosedError("%s: async mapper is closed" % op, op=op)
        return self._h

    def submit(self, reservation, virt_pages, pool, phys_pages) -> int:
        """Queue ``reservation.map(virt_pages, pool, phys_pages)``; returns a ticket at once."""
        virt = as_pages(virt_pages, "virt_pages")
        phys = as_pages(phys_pages, "phys_pages")
        if virt.size != phys.size:
            check(INVALID, "submit", num_virt=virt.size, num_phys=phys.size)
        ticket = ffi.new("uint64_t *")
        rc = lib.vmem_worker_submit_map(self._handle("submit"), reservation._handle("submit"),
                                        pool._handle("submit"), _i64(virt), _i64(phys), virt.size, ticket)
        check(rc, "submit", num_pages=virt.size)
        with self._lock:
            self._jobs[int(ticket[0])] = ("map", reservation, pool, virt.size)
        return int(ticket[0])

    def submit_unmap(self, reservation, virt_pages) -> int:
        """Queue ``reservation.unmap(virt_pages)``; returns a ticket at once."""
        virt = as_pages(virt_pages, "virt_pages")
        ticket = ffi.new("uint64_t *")
        rc = lib.vmem_worker_submit_unmap(self._handle("submit_unmap"), reservation._handle("submit_unmap"),
                                          _i64(virt), virt.size, ticket)
        check(rc, "submit_unmap", num_pages=virt.size)
        with self._lock:
            self._jobs[int(ticket[0])] = ("unmap", reservation, None, virt.size)
        return int(ticket[0])

    def done(self, ticket: int) -> bool:
        """True when ``wait(ticket)`` would not block."""
        return lib.vmem_worker_poll(self._handle("done"), ticket) == 1

    def wait(self, ticket: int) -> None:
        """Block until the job ran; raise like Reservation.map/unmap if it failed (it was rolled back)."""
        h = self._handle("wait")
        with self._lock:  # claim the ticket first: the native wait frees the job, so only one may wait
            job = self._jobs.pop(ticket, None)
        if job is None:
            raise VmemInvalidArgument("wait(%r): unknown ticket, or already waited" % (ticket,), op="wait")
        op, _resv, _pool, n = job
        err = ffi.new("vmem_err_t *")
        rc = lib.vmem_worker_wait(h, ticket, err)
        if rc:
            check_err(rc, op, err, num_pages=n, ticket=ticket, needed_pages=n)

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return int(lib.vmem_worker_pending(self._handle("pending")))

    def close(self) -> None:
        """Let queued jobs run, then join the thread. Unwaited tickets are dropped."""
        if self._h is not None:
            h, self._h = self._h, None
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
