"""Backend, Reservation and PagePool: Python objects over the native primitives (vmem/_native/vmem.h).

Plan vs run: ``map``, ``unmap``, ``grow``, ``trim``, ``reserve`` and ``create_pool`` talk to the OS or the
driver (never inside a CUDA graph); ``tensor()``, ``address`` and ``mapping()`` are pure bookkeeping.
See Note [Host backend] in vmem/_native/host.c for how the host backend works and what it costs.
"""
from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from vmem._native import as_pages, ffi, lib
from vmem.backends import _fork
from vmem.backends._handle import NativeHandle, refuse_copy
from vmem.errors import (INVALID, VmemClosedError, VmemInvalidArgument, check, check_err)

_FAULT_CODES = {"oom": 1, "map_limit": 2, "invalid": 3, "driver": 4}


def _fault_code(error: str) -> int:
    code = _FAULT_CODES.get(error)
    if code is None:
        raise VmemInvalidArgument("inject_fault: error must be one of %s, got %r" % (sorted(_FAULT_CODES), error),
                                  op="inject_fault")
    return code


_tls = threading.local()


def _new_err():
    """A ``vmem_err_t *`` for this thread (reused: the hot map path allocates nothing)."""
    err = getattr(_tls, "err", None)
    if err is None:
        err = _tls.err = ffi.new("vmem_err_t *")
    return err


def _i64(arr: np.ndarray):
    return ffi.from_buffer("int64_t[]", arr) if arr.size else ffi.NULL


_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1


def _int_arg(value, name: str, op: str, lo: int = 0, hi: int = _INT64_MAX) -> int:
    """``int(value)`` checked against ``[lo, hi]`` (the C type's range), so cffi never raises OverflowError."""
    value = int(value)
    if not lo <= value <= hi:
        raise VmemInvalidArgument("%s: %s=%d is out of range [%d, %d]" % (op, name, value, lo, hi), op=op)
    return value


class Backend:
    """One kind of virtual memory: ``"host"`` (memfd + mmap) or ``"cuda"`` (driver VMM API).

    Get one with :func:`vmem.backends.get_backend`; instances are shared per (kind, device), so
    ``copy.copy``/``deepcopy`` return the same object and pickling is refused (VmemInvalidArgument).
    """

    __reduce_ex__ = refuse_copy

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __init__(self, kind: str, device: int = 0):
        code = {"host": lib.VMEM_KIND_HOST, "cuda": lib.VMEM_KIND_CUDA}.get(kind)
        if code is None:
            raise VmemInvalidArgument("backend kind must be 'host' or 'cuda', got %r" % (kind,), op="backend")
        out = ffi.new("vmem_backend_t **")
        err = _new_err()
        rc = lib.vmem_backend_open(code, device, out, err)
        check_err(rc, "open_backend", err, kind=kind, device=device)
        self._gen = _fork.generation()
        self._h = ffi.gc(out[0], _fork.guarded(lib.vmem_backend_close, self._gen))
        self.name = kind
        self.device_index = device if kind == "cuda" else -1
        info = self._info()
        self.granularity_bytes = int(info.granularity_bytes)

    @property
    def device(self):
        """torch.device of the memory: ``cuda:N`` or ``cpu``."""
        import torch

        return torch.device("cuda", self.device_index) if self.name == "cuda" else torch.device("cpu")

    def _handle(self, op: str):
        if not _fork.current(self._gen):
            _fork.refuse(self, op)
        return self._h

    def _info(self):
        out = ffi.new("vmem_backend_info_t *")
        lib.vmem_backend_info(self._handle("backend.info"), out)
        return out

    def info(self) -> dict:
        """Limits and capabilities: granularity, vm.max_map_count, mapping budget and use, huge pages."""
        i = self._info()
        return {
            "backend": self.name,
            "device": self.device_index,
            "granularity_bytes": int(i.granularity_bytes),
            "max_map_count": int(i.max_map_count),
            "map_budget": int(i.map_budget),
            "mappings_used": int(i.mappings_used),
            "hugetlb_available": bool(i.hugetlb_available),
        }

    def set_map_budget(self, num_mappings: int) -> None:
        """Cap the mapping budget; the one derived from vm.max_map_count still applies when lower."""
        num_mappings = _int_arg(num_mappings, "num_mappings", "set_map_budget", lo=-1)  # < 0: C says INVALID
        check(lib.vmem_backend_set_map_budget(self._handle("set_map_budget"), num_mappings), "set_map_budget",
              num_mappings=num_mappings)

    def check_page_bytes(self, page_bytes: int) -> None:
        if page_bytes <= 0 or page_bytes > _UINT64_MAX or page_bytes % self.granularity_bytes:
            raise VmemInvalidArgument(
                "page_bytes=%d must be a positive multiple of the %s granularity %d"
                % (page_bytes, self.name, self.granularity_bytes), op="page_bytes")

    def reserve(self, num_bytes: int, page_bytes: int) -> "Reservation":
        """Reserve ``num_bytes`` (rounded up to ``page_bytes``) of virtual address space; nothing mapped."""
        return Reservation(self, int(num_bytes), int(page_bytes))

    def create_pool(self, page_bytes: int, num_pages: int, max_pages: Optional[int] = None,
                    lease=None) -> "PagePool":
        """A pool of ``num_pages`` physical pages of ``page_bytes`` (ids ``[0, num_pages)``).

        ``lease`` (a vmem.backends.budget.Lease): an elastic pool, starting with no memory; each page is
        charged to the lease by the map that gives it memory and given back by ``trim``.
        """
        return PagePool(self, int(page_bytes), int(num_pages), max_pages, lease)

    def async_mapper(self) -> "AsyncMapper":
        from vmem.backends.async_mapper import AsyncMapper

        return AsyncMapper(self)

    def __repr__(self) -> str:
        return "Backend(%r, granularity_bytes=%d)" % (self.name, self.granularity_bytes)


class PagePool(NativeHandle):
    """Physical pages ``[0, num_pages)`` of ``page_bytes`` each.

    Host: a memfd; a page gets memory when first mapped (``MAP_POPULATE``) and gives it back on
    ``trim``. CUDA: one ``cuMemCreate`` handle per page, created up front (pooled); an elastic pool
    (``lease=``) creates none up front: a map creates the handles it needs, batched, and trim releases them.
    Invariant: ``backed_pages * page_bytes == resident_bytes()`` on the host.
    Copy and pickle are refused (VmemInvalidArgument): the copy would share the native pool.
    """

    _what = "pool"

    def __init__(self, backend: Backend, page_bytes: int, num_pages: int, max_pages: Optional[int], lease=None):
        backend.check_page_bytes(page_bytes)
        if (num_pages < 0 or num_pages > _INT64_MAX
                or (max_pages is not None and not num_pages <= max_pages <= _INT64_MAX)):
            raise VmemInvalidArgument("num_pages=%d, max_pages=%r: need 0 <= num_pages <= max_pages"
                                      % (num_pages, max_pages), op="create_pool")
        out = ffi.new("vmem_pool_t **")
        err = _new_err()
        if lease is None:
            rc = lib.vmem_pool_create(backend._handle("create_pool"), page_bytes, num_pages, max_pages or 0, out, err)
        else:
            rc = lib.vmem_pool_create_elastic(backend._handle("create_pool"), page_bytes, num_pages, max_pages or 0,
                                              lease._handle("create_pool"), out, err)
        check_err(rc, "create_pool", err, page_bytes=page_bytes, num_pages=num_pages, needed_pages=num_pages,
                  created_pages=int(err.available) if rc else None)
        self._gen = _fork.generation()
        self._h = ffi.gc(out[0], _fork.guarded(lib.vmem_pool_close, self._gen))
        self.backend = backend
        self.page_bytes = page_bytes
        self.max_pages = max_pages
        self.lease = lease
        self.id = int(lib.vmem_pool_id(self._h))
        _fork.track_pool(self, self.info()["fd"])

    # -- state
    def info(self) -> dict:
        """Counters: num_pages, backed_pages, mapped_pages, mappings, resident_bytes, hugetlb; fd (host memfd);
        charged_pages (elastic pools: pages charged to the lease; -1 otherwise)."""
        out = ffi.new("vmem_pool_info_t *")
        lib.vmem_pool_info(self._handle("pool.info"), out)
        return {k: int(getattr(out, k)) for k in ("page_bytes", "num_pages", "max_pages", "backed_pages",
                                                  "mapped_pages", "mappings", "resident_bytes", "hugetlb",
                                                  "fd", "charged_pages")}

    @property
    def num_pages(self) -> int:
        return self.info()["num_pages"]

    def resident_bytes(self) -> int:
        """Bytes the OS says the pool holds (host: memfd ``st_blocks * 512``)."""
        return self.info()["resident_bytes"]

    # -- operations (talk to the OS / driver)
    def grow(self, num_pages: int) -> None:
        """Add ``num_pages`` page ids at the end."""
        err = _new_err()
        rc = lib.vmem_pool_grow(self._handle("grow"), _int_arg(num_pages, "num_pages", "grow", lo=-1), err)
        check_err(rc, "grow", err, num_pages=num_pages, max_pages=self.max_pages, needed_pages=num_pages)

    def trim(self, phys_pages) -> None:
        """Give the memory of unmapped pages back to the OS/driver; the ids stay usable.

        phys_pages: [n] int64. Raises VmemBusyError (nothing trimmed) if one is still mapped.
        """
        arr = as_pages(phys_pages, "phys_pages")
        err = _new_err()
        rc = lib.vmem_pool_trim(self._handle("trim"), _i64(arr), arr.size, err)
        check_err(rc, "trim", err, num_pages=arr.size)

    def inject_fault(self, nth: int, error: str = "driver") -> None:
        """Testing: the ``nth`` (1-based) map op issued on this pool fails with ``error``; 0 disarms."""
        check(lib.vmem_pool_inject_fault(self._handle("inject_fault"), _int_arg(nth, "nth", "inject_fault", lo=-1),
                                         _fault_code(error)),
              "inject_fault")

    def close(self) -> None:
        """Close the pool. Memory under existing mappings lives on until they are unmapped.

        Not concurrently with a map on another thread that uses this pool (queued AsyncMapper jobs are safe).
        In a forked child it only forgets the pool (the parent's): no native call.
        """
        if self._h is not None:
            h, self._h = self._h, None
            if _fork.current(self._gen):
                _fork.untrack(self)
            ffi.release(h)          # the guarded destructor does nothing in a forked child

    def __repr__(self) -> str:
        if self._h is None:
            return "PagePool(closed)"
        i = self.info()
        return "PagePool(%s, page_bytes=%d, num_pages=%d, mapped_pages=%d)" % (
            self.backend.name, self.page_bytes, i["num_pages"], i["mapped_pages"])


class Reservation(NativeHandle):
    """A contiguous virtual range ``[address, address + num_bytes)`` of ``num_pages`` pages.

    Host: unmapped pages read as zeros and fault on write. ``map``/``unmap`` are one native call each,
    all or nothing. ``tensor()`` views keep the reservation alive: ``close()`` with live views only marks
    it closed; the range is released when the last view goes away. Copy and pickle are refused
    (VmemInvalidArgument): the copy would share the native reservation.
    """

    _what = "reservation"

    def __init__(self, backend: Backend, num_bytes: int, page_bytes: int):
        backend.check_page_bytes(page_bytes)
        _int_arg(num_bytes, "num_bytes", "reserve", lo=1, hi=_UINT64_MAX)
        out = ffi.new("vmem_resv_t **")
        err = _new_err()
        rc = lib.vmem_reserve(backend._handle("reserve"), num_bytes, page_bytes, out, err)
        check_err(rc, "reserve", err, num_bytes=num_bytes, page_bytes=page_bytes)
        self._gen = _fork.generation()
        self._h = ffi.gc(out[0], _fork.guarded(lib.vmem_release, self._gen))
        self.backend = backend
        info = ffi.new("vmem_resv_info_t *")
        lib.vmem_resv_info(self._h, info)
        self.address = int(info.address)
        self.num_bytes = int(info.num_bytes)
        self.page_bytes = page_bytes
        self.num_pages = int(info.num_pages)
        self._closing = False
        self._live_views = 0
        self._lock = threading.Lock()
        _fork.track_reservation(self)

    # -- state
    def _is_closed(self) -> bool:
        return self._closing or self._h is None

    def stats(self) -> dict:
        """Counters: mapped_pages, num_mappings, map/unmap calls, OS ops, pages mapped/unmapped in total."""
        out = ffi.new("vmem_resv_info_t *")
        lib.vmem_resv_info(self._handle("stats"), out)
        return {k: int(getattr(out, k)) for k in (
            "mapped_pages", "num_mappings", "map_calls", "unmap_calls", "map_ops", "unmap_ops",
            "pages_mapped_total", "pages_unmapped_total")}

    @property
    def num_mappings(self) -> int:
        """OS mappings (VMAs) this reservation holds (host) / contiguous mapped runs (cuda)."""
        return self.stats()["num_mappings"]

    @property
    def mapped_pages(self) -> int:
        return self.stats()["mapped_pages"]

    def mapping(self, first: int = 0, num: Optional[int] = None, with_pool: bool = False):
        """Physical page under each virtual page ``[first, first+num)``: int64 ``[num]``, -1 = unmapped.

        ``with_pool=True`` also returns the pool id of each page (int32 ``[num]``, -1 = unmapped).
        """
        first = int(first)
        num = self.num_pages - first if num is None else int(num)
        if not (0 <= first and 0 <= num and first + num <= self.num_pages):
            raise VmemInvalidArgument("mapping(first=%d, num=%d): outside the reservation's %d pages"
                                      % (first, num, self.num_pages), op="mapping")
        phys = np.empty(num, dtype=np.int64)
        pools = np.empty(num, dtype=np.int32) if with_pool else None
        rc = lib.vmem_resv_read_table(self._handle("mapping"), first, num, _i64(phys),
                                      ffi.from_buffer("int32_t[]", pools) if with_pool and num else ffi.NULL)
        check(rc, "mapping", first=first, num=num, num_pages=self.num_pages)
        return (phys, pools) if with_pool else phys

    # -- operations (talk to the OS / driver)
    def map(self, virt_pages, pool: PagePool, phys_pages) -> None:
        """Map ``phys_pages[i]`` of ``pool`` at ``virt_pages[i]``; one native call, all or nothing.

        virt_pages, phys_pages: [n] int64 (any int sequence). Contiguous virtual pages over contiguous
        physical pages become one OS mapping.
        """
        virt = as_pages(virt_pages, "virt_pages")
        phys = as_pages(phys_pages, "phys_pages")
        if virt.size != phys.size:
            check(INVALID, "map", num_virt=virt.size, num_phys=phys.size)
        err = _new_err()
        rc = lib.vmem_map(self._handle("map"), pool._handle("map"), _i64(virt), _i64(phys), virt.size, err)
        if rc:
            budget = err.detail == lib.VMEM_DETAIL_BUDGET   # pages to charge, pages the budget has left
            check_err(rc, "map", err, num_pages=virt.size, page_bytes=self.page_bytes,
                      needed_pages=int(err.needed) if budget else virt.size,
                      free_pages=int(err.available) if budget else None)

    def unmap(self, virt_pages) -> None:
        """Unmap ``virt_pages`` ([n] int64); one native call, all or nothing. Host: they read as zeros."""
        virt = as_pages(virt_pages, "virt_pages")
        err = _new_err()
        rc = lib.vmem_unmap(self._handle("unmap"), _i64(virt), virt.size, err)
        if rc:
            check_err(rc, "unmap", err, num_pages=virt.size, page_bytes=self.page_bytes)

    def inject_fault(self, nth: int, error: str = "driver") -> None:
        """Testing: the ``nth`` (1-based) OS map/unmap op of this reservation fails with ``error``."""
        check(lib.vmem_resv_inject_fault(self._handle("inject_fault"), _int_arg(nth, "nth", "inject_fault", lo=-1),
                                         _fault_code(error)),
              "inject_fault")

    def tensor(self, dtype, shape, offset_bytes: int = 0, strides=None):
        """Zero-copy torch view ``shape`` of ``dtype`` at ``address + offset_bytes`` (strides in elements).

        Touches no memory. The view keeps this reservation alive. On the host, reading an unmapped
        page gives zeros and writing one raises SIGSEGV: map first.
        """
        from vmem.backends.views import make_view

        return make_view(self, dtype, shape, offset_bytes, strides)

    # -- lifetime
    def _view_born(self) -> None:
        with self._lock:   # checked here, not before: a close() on another thread may release meanwhile
            if self._closing or self._h is None:
                raise VmemClosedError("tensor: reservation is closed", op="tensor")
            self._live_views += 1

    def _view_died(self) -> None:
        if not _fork.current(self._gen):     # a forked child: the lock may be held by a parent's thread
            return
        with self._lock:
            self._live_views -= 1
            release = self._closing and self._live_views == 0
        if release:
            self._release()

    def _release(self) -> None:
        if self._h is not None:
            h, self._h = self._h, None
            _fork.untrack(self)
            ffi.release(h)

    def close(self) -> None:
        """Unmap everything and free the range, once no tensor view is left (else when the last dies).

        Not concurrently with a map/unmap of this reservation on another thread (join it first);
        jobs queued on an AsyncMapper are safe: they hold the native object and report VmemClosedError.
        In a forked child it only forgets the reservation (the parent's): no native call, no lock.
        """
        if not _fork.current(self._gen):
            self._closing, self._h = True, None
            return
        with self._lock:
            if self._closing:
                return
            self._closing = True
            release = self._live_views == 0
        if release:
            self._release()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "mapped_pages=%d" % self.mapped_pages
        return "Reservation(%s, address=0x%x, num_pages=%d, page_bytes=%d, %s)" % (
            self.backend.name, self.address, self.num_pages, self.page_bytes, state)
