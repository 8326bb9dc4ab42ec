"""Budget and Lease: KV memory shared by pools, caches and processes (Note [Shared KV budget] in
vmem/_native/budget.c).

A Budget is a small segment file (``/dev/shm/vmem-kv-NAME`` for a bare name) holding a limit in bytes and
one lease per tenant. A Lease charges the budget: explicitly (``take``/``give``) or, for a pool created
with ``Backend.create_pool(..., lease=lease)``, inside every map that gives a page memory, so taking
memory is atomic across processes. A tenant that dies (SIGKILL included) has its lease freed by the next
tenant that touches the budget.

Plan vs run: every call here takes the segment's process-shared lock (microseconds; at most
``VMEM_BUDGET_LOCK_MS``, default 2000 ms, then VmemBusyError); none talks to the driver.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

from vmem._native import ffi, lib
from vmem.backends import _fork
from vmem.backends._handle import NativeHandle
from vmem.errors import VmemInvalidArgument, check, check_err

_INT64_MAX = 2**63 - 1
DEFAULT_DIR = "/dev/shm"


def budget_path(name: str) -> str:
    """Segment file of budget ``name``: a path as given, a bare name under /dev/shm (``vmem-kv-NAME``)."""
    name = str(name)
    if not name or "\0" in name:
        raise VmemInvalidArgument("budget name must be a non-empty string, got %r" % (name,), op="budget")
    if "/" in name:
        return name
    return os.path.join(DEFAULT_DIR, "vmem-kv-" + name)


class BudgetInfo(NamedTuple):
    limit_bytes: int
    held_bytes: int            # sum over live leases
    waiting_bytes: int         # demand refused in the last 2 s
    reclaimable_bytes: int     # what tenants say they could give back
    reserved_bytes: int        # unmet guaranteed minimums
    num_tenants: int
    max_tenants: int
    recovered_leases: int      # dead tenants' leases freed so far
    recovered_bytes: int


class TenantInfo(NamedTuple):
    slot: int
    pid: int
    name: str
    held_bytes: int
    min_bytes: int
    max_bytes: int             # 0: none
    waiting_bytes: int
    reclaimable_bytes: int
    peak_bytes: int


class LeaseInfo(NamedTuple):
    slot: int
    limit_bytes: int
    total_held_bytes: int
    free_bytes: int            # what this lease may take now
    held_bytes: int
    min_bytes: int
    max_bytes: int
    peak_bytes: int
    waiting_bytes: int
    others_waiting_bytes: int
    others_reclaimable_bytes: int
    num_others: int
    recovered_leases: int


def _bytes_arg(value, name: str, op: str, lo: int = 0) -> int:
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise VmemInvalidArgument("%s: %s must be an integer number of bytes, got %r" % (op, name, value),
                                  op=op) from None
    if not lo <= value <= _INT64_MAX:
        raise VmemInvalidArgument("%s: %s=%d is out of range [%d, 2^63)" % (op, name, value, lo), op=op)
    return value


class Budget(NativeHandle):
    """One shared KV memory budget. ``limit_bytes`` creates the segment when absent (else it must exist).

    Raises VmemInvalidArgument for a file that is not a budget of this version (corrupt, foreign), or a
    missing one without ``limit_bytes``.
    """

    _what = "budget"

    def __init__(self, path_or_name: str, limit_bytes: Optional[int] = None):
        self.path = budget_path(path_or_name)
        limit = 0 if limit_bytes is None else _bytes_arg(limit_bytes, "limit_bytes", "budget", lo=1)
        out = ffi.new("vmem_budget_t **")
        err = ffi.new("vmem_err_t *")
        rc = lib.vmem_budget_open(self.path.encode(), limit, out, err)
        if rc and err.detail == lib.VMEM_DETAIL_BUDGET_SEGMENT:
            raise VmemInvalidArgument(
                "budget %s: %s" % (self.path, "no such budget (give limit_bytes to create it)" if err.os_error
                                   else "not a vmem budget segment of this version (corrupt or foreign file; "
                                        "remove it if no tenant uses it)"), op="budget", path=self.path)
        check_err(rc, "budget", err, path=self.path)
        self._gen = _fork.generation()
        self._h = ffi.gc(out[0], _fork.guarded(lib.vmem_budget_close, self._gen))

    def info(self) -> BudgetInfo:
        out = ffi.new("vmem_budget_info_t *")
        err = ffi.new("vmem_err_t *")
        check_err(lib.vmem_budget_info(self._handle("budget.info"), out, err), "budget.info", err, path=self.path)
        return BudgetInfo(*(int(getattr(out, f)) for f in BudgetInfo._fields))

    @property
    def limit_bytes(self) -> int:
        return self.info().limit_bytes

    def tenants(self) -> list:
        """Live leases: [TenantInfo], slot order (dead tenants are recovered first)."""
        out = ffi.new("vmem_tenant_info_t[]", lib.VMEM_BUDGET_MAX_TENANTS)
        num = ffi.new("int32_t *")
        err = ffi.new("vmem_err_t *")
        rc = lib.vmem_budget_tenants(self._handle("budget.tenants"), out, lib.VMEM_BUDGET_MAX_TENANTS, num, err)
        check_err(rc, "budget.tenants", err, path=self.path)
        return [TenantInfo(int(t.slot), int(t.pid), ffi.string(t.name).decode(errors="replace"),
                           int(t.held_bytes), int(t.min_bytes), int(t.max_bytes), int(t.waiting_bytes),
                           int(t.reclaimable_bytes), int(t.peak_bytes)) for t in out[0:num[0]]]

    def set_limit(self, limit_bytes: int) -> None:
        """Change the limit; VmemBusyError (nothing changed) below what is held plus unmet minimums."""
        limit = _bytes_arg(limit_bytes, "limit_bytes", "set_limit", lo=1)
        err = ffi.new("vmem_err_t *")
        rc = lib.vmem_budget_set_limit(self._handle("set_limit"), limit, err)
        if rc and err.detail == lib.VMEM_DETAIL_BUDGET_HELD:
            check_err(rc, "set_limit", err, limit_bytes=limit, held_bytes=int(err.needed))
        check_err(rc, "set_limit", err, limit_bytes=limit)

    def lease(self, name: str = "", *, min_bytes: int = 0, max_bytes: Optional[int] = None) -> "Lease":
        """A new tenant: ``min_bytes`` guaranteed (must be free now, else VmemOutOfMemory),
        ``max_bytes`` a cap (None: the limit)."""
        return Lease(self, name, min_bytes, max_bytes)

    def close(self) -> None:
        """Unmap the segment here (leases keep it mapped until they close); the file stays."""
        if self._h is not None:
            h, self._h = self._h, None
            ffi.release(h)

    def unlink(self) -> None:
        """Remove the segment file (tenants that have it open keep using it)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __repr__(self) -> str:
        if self._h is None:
            return "Budget(%r, closed)" % self.path
        i = self.info()
        return "Budget(%r, limit_bytes=%d, held_bytes=%d, tenants=%d)" % (
            self.path, i.limit_bytes, i.held_bytes, i.num_tenants)


class Lease(NativeHandle):
    """One tenant's share of a Budget: bytes held, optional guaranteed minimum and maximum.

    Used by the process that opened it: a forked child's use raises VmemForkedError.
    Pools created with it (``Backend.create_pool(..., lease=...)``) keep its record alive until they go.
    """

    _what = "lease"

    def __init__(self, budget: Budget, name: str, min_bytes: int, max_bytes: Optional[int]):
        min_b = _bytes_arg(min_bytes, "min_bytes", "lease")
        max_b = 0 if max_bytes is None else _bytes_arg(max_bytes, "max_bytes", "lease", lo=1)
        if max_b and max_b < min_b:
            raise VmemInvalidArgument("lease: max_bytes=%d below min_bytes=%d" % (max_b, min_b), op="lease")
        out = ffi.new("vmem_lease_t **")
        err = ffi.new("vmem_err_t *")
        rc = lib.vmem_lease_open(budget._handle("lease"), str(name).encode()[:31], min_b, max_b, out, err)
        check_err(rc, "lease", err, path=budget.path, min_bytes=min_b,
                  needed_pages=int(err.needed) if rc else None, free_pages=int(err.available) if rc else None)
        self._gen = _fork.generation()
        self._h = ffi.gc(out[0], _fork.guarded(lib.vmem_lease_close, self._gen))
        self.budget = budget
        self.name = str(name)

    def take(self, num_bytes: int) -> None:
        """Charge ``num_bytes``, all or nothing: VmemOutOfMemory (the shortfall becomes waiting demand)."""
        n = _bytes_arg(num_bytes, "num_bytes", "take")
        err = ffi.new("vmem_err_t *")
        rc = lib.vmem_lease_take(self._handle("take"), n, err)
        check_err(rc, "lease.take", err, num_bytes=n, needed_pages=int(err.needed) if rc else None,
                  free_pages=int(err.available) if rc else None)

    def wait(self, num_bytes: int, timeout_s: float) -> None:
        """``take``, retried (every ms) until ``timeout_s``; then VmemOutOfMemory."""
        n = _bytes_arg(num_bytes, "num_bytes", "wait")
        if not 0 <= timeout_s < 1e9:
            raise VmemInvalidArgument("wait: timeout_s=%r must be in [0, 1e9)" % (timeout_s,), op="wait")
        err = ffi.new("vmem_err_t *")
        rc = lib.vmem_lease_wait(self._handle("wait"), n, int(timeout_s * 1000), err)
        check_err(rc, "lease.wait", err, num_bytes=n, timeout_s=timeout_s,
                  needed_pages=int(err.needed) if rc else None, free_pages=int(err.available) if rc else None)

    def give(self, num_bytes: int) -> None:
        """Give back ``num_bytes`` taken with ``take`` (clamped at what is held)."""
        check(lib.vmem_lease_give(self._handle("give"), _bytes_arg(num_bytes, "num_bytes", "give")), "lease.give")

    def set_reclaimable(self, num_bytes: int) -> None:
        """Publish what this tenant could give back now (idle pages), for the other tenants to see."""
        check(lib.vmem_lease_set_reclaimable(self._handle("set_reclaimable"),
                                             _bytes_arg(num_bytes, "num_bytes", "set_reclaimable")),
              "lease.set_reclaimable")

    def set_demand(self, num_bytes: int) -> None:
        """Say this tenant waits for ``num_bytes`` more (0: no longer) without taking them; the other
        tenants see it (LeaseInfo.others_waiting_bytes) for 2 s unless renewed."""
        check(lib.vmem_lease_set_demand(self._handle("set_demand"), _bytes_arg(num_bytes, "num_bytes", "set_demand")),
              "lease.set_demand")

    def info(self) -> LeaseInfo:
        out = ffi.new("vmem_lease_info_t *")
        err = ffi.new("vmem_err_t *")
        check_err(lib.vmem_lease_info(self._handle("lease.info"), out, err), "lease.info", err)
        return LeaseInfo(*(int(getattr(out, f)) for f in LeaseInfo._fields))

    def close(self) -> None:
        """Give the lease's record back (once the pools made with it are gone too)."""
        if self._h is not None:
            h, self._h = self._h, None
            ffi.release(h)

    def __repr__(self) -> str:
        if self._h is None:
            return "Lease(%r, closed)" % self.name
        i = self.info()
        return "Lease(%r, held_bytes=%d, min_bytes=%d, max_bytes=%d)" % (self.name, i.held_bytes, i.min_bytes,
                                                                        i.max_bytes)
