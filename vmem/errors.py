"""Exceptions vmem raises, and ``check``: the one place native status codes become exceptions.

Status codes (vmem/_native/vmem.h)::

    0 OK   1 OOM   2 MAP_LIMIT   3 INVALID   4 DRIVER   5 UNSUPPORTED   6 CLOSED   7 BUSY
"""
from __future__ import annotations

OK, OOM, MAP_LIMIT, INVALID, DRIVER, UNSUPPORTED, CLOSED, BUSY = range(8)

MAX_POOLS = 4096   # VMEM_MAX_POOLS: pools one backend holds open at once

# err.detail values (VMEM_DETAIL_* in vmem.h) -> what went wrong, in words
DETAILS = {
    0: "",
    1: "size is not a multiple of the granularity",
    2: "virtual page outside the reservation",
    3: "physical page outside the pool",
    4: "virtual page is already mapped",
    5: "virtual page is not mapped",
    6: "the same virtual page appears twice in the batch",
    7: "pool and reservation page sizes differ",
    8: "pool and reservation come from different backends",
    9: "physical page is still mapped",
    10: "size beyond what the address space or pool may hold",
    11: "pool would grow beyond max_pages",
    12: "failure injected for testing",
    13: "the shared KV budget has no room",
    14: "not a vmem budget segment of this version",
    15: "the new limit is below what tenants hold (plus unmet guaranteed minimums)",
    16: "the budget's lock was not acquired in time (VMEM_BUDGET_LOCK_MS)",
    17: "every lease slot of the budget is taken",
    18: "the lease belongs to another process (opened before fork)",
    19: "the lease record is gone (closed, or recovered as stale)",
    20: "the backend holds %d pools already (VMEM_MAX_POOLS): close one first" % MAX_POOLS,
}


class VmemError(Exception):
    """Base of everything vmem raises. ``.op`` names the failed operation, ``.context`` the numbers."""

    def __init__(self, message: str, *, op: str = "", **context):
        super().__init__(message)
        self.op = op
        self.context = context


class VmemOutOfMemory(VmemError, MemoryError):
    """Physical pages (or address space) ran out. ``.needed_pages`` / ``.free_pages`` when known."""

    def __init__(self, message: str, *, op: str = "", needed_pages=None, free_pages=None, **context):
        super().__init__(message, op=op, **context)
        self.needed_pages = needed_pages
        self.free_pages = free_pages


class VmemMapLimitError(VmemError, OSError):
    """The mapping budget derived from the ``vm.max_map_count`` sysctl would be exceeded."""


class VmemInvalidArgument(VmemError, ValueError):
    """Bad argument: unaligned size, page out of range, double map / unmap, ..."""


class VmemDriverError(VmemError, RuntimeError):
    """The OS or the CUDA driver failed. ``.code`` is the errno or CUresult."""

    def __init__(self, message: str, *, op: str = "", code: int = 0, **context):
        super().__init__(message, op=op, **context)
        self.code = code


class VmemClosedError(VmemError, ValueError):
    """Use after close()."""


class VmemUnsupported(VmemError, RuntimeError):
    """The backend is not available on this machine (e.g. no libcuda.so.1 or no device)."""


class VmemBusyError(VmemError, RuntimeError):
    """The object is in use (e.g. trimming a physical page that is still mapped)."""


class VmemForkedError(VmemError, RuntimeError):
    """Use, in a forked child, of a native object created before os.fork() (it belongs to the parent).

    The child refuses inherited reservations, pools, async mappers and backends; it may create its own.
    See vmem/backends/_fork.py."""


class VmemIntegrityError(VmemError, AssertionError):
    """An invariant does not hold (raised by check_integrity())."""


class VmemSlotError(VmemError, KeyError):
    """Allocator: unknown or freed slot, double free, or all slots taken."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _describe(op: str, context: dict) -> str:
    parts = ["%s=%s" % (k, v) for k, v in context.items() if v is not None]
    return "%s(%s)" % (op, ", ".join(parts)) if parts else op


def check(rc: int, op: str, *, detail: int = 0, os_error: int = 0, index: int = -1,
          needed=None, available=None, **context) -> None:
    """Raise the exception for native status ``rc`` (no-op for 0).

    ``detail``, ``os_error``, ``index``, ``needed``, ``available`` come from the native vmem_err_t;
    ``context`` adds what the caller knows (page counts, device, ...). ``needed_pages`` /
    ``free_pages`` in the context land on VmemOutOfMemory's attributes.
    """
    if rc == OK:
        return
    where = _describe(op, context)
    what = DETAILS.get(detail, "detail %d" % detail)
    if index is not None and index >= 0:
        what = (what + " " if what else "") + "(batch index %d)" % index
    if rc == OOM:
        needed_pages = context.pop("needed_pages", None)
        free_pages = context.pop("free_pages", None)
        msg = "%s: out of memory" % where
        if what:
            msg += ": " + what
        if os_error:
            msg += " [errno %d]" % os_error
        raise VmemOutOfMemory(msg, op=op, needed_pages=needed_pages, free_pages=free_pages,
                              index=index, **context)
    if rc == MAP_LIMIT:
        if needed is not None and available is not None and not os_error:
            msg = ("%s: needs %d more mappings but only %d are left under the process limit "
                   "vm.max_map_count (see /proc/sys/vm/max_map_count); map physically contiguous "
                   "pages so mappings merge, use larger pages, or raise the sysctl"
                   % (where, needed, available))
        else:
            msg = ("%s: the kernel refused a new mapping (errno %d): the process is at its limit "
                   "vm.max_map_count (see /proc/sys/vm/max_map_count)" % (where, os_error))
        raise VmemMapLimitError(msg, op=op, needed=needed, available=available, **context)
    if rc == INVALID:
        raise VmemInvalidArgument("%s: invalid argument: %s" % (where, what or "rejected"), op=op,
                                  index=index, **context)
    if rc == DRIVER:
        msg = "%s: driver/OS call failed with code %d" % (where, os_error)
        if what:
            msg += ": " + what
        raise VmemDriverError(msg, op=op, code=os_error, index=index, **context)
    if rc == UNSUPPORTED:
        why = ("driver code %d" % os_error) if os_error else "libcuda.so.1 missing, no such device, or no VMM support"
        raise VmemUnsupported("%s: not supported on this machine (%s)" % (where, why), op=op, code=os_error,
                              **context)
    if rc == CLOSED:
        raise VmemClosedError("%s: object is closed" % where, op=op, **context)
    if rc == BUSY:
        raise VmemBusyError("%s: busy: %s" % (where, what or "in use"), op=op, index=index, **context)
    raise VmemError("%s: unknown status %d" % (where, rc), op=op, **context)


def check_err(rc: int, op: str, err, **context) -> None:
    """``check`` with the fields of a native ``vmem_err_t *`` (cffi cdata)."""
    if rc == OK:
        return
    check(rc, op, detail=err.detail, os_error=err.os_error, index=err.index,
          needed=err.needed, available=err.available, **context)


__all__ = [
    "VmemError", "VmemOutOfMemory", "VmemMapLimitError", "VmemInvalidArgument", "VmemDriverError",
    "VmemClosedError", "VmemUnsupported", "VmemBusyError", "VmemForkedError", "VmemIntegrityError", "VmemSlotError",
    "check", "check_err",
]
