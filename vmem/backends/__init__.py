"""Virtual-memory backends: ``get_backend("auto" | "host" | "cuda")``, Reservation, PagePool, AsyncMapper.

Contract: docs/structure.md ("backends"). Host: Note [Host backend] in vmem/_native/host.c.
Threads: every method may be called from any thread (the native layer locks). fork(): objects made
before a fork refuse use in the child with VmemForkedError and close without a native call; the child
makes its own (vmem/backends/_fork.py).
"""
from __future__ import annotations

import threading

from vmem.backends import _fork
from vmem.backends.async_mapper import AsyncMapper
from vmem.backends.base import Backend, PagePool, Reservation
from vmem.backends.budget import Budget, Lease, budget_path
from vmem.errors import VmemInvalidArgument, VmemUnsupported

_backends = {}
_lock = threading.Lock()


def get_backend(kind: str = "auto", device: int = 0) -> Backend:
    """The shared Backend of ``kind`` on ``device``.

    ``"auto"``: cuda when libcuda.so.1 loads and the device exists, else host.
    ``"cuda"`` without a driver or device raises VmemUnsupported.
    """
    if isinstance(kind, Backend):
        return kind
    if kind not in ("auto", "host", "cuda"):
        raise VmemInvalidArgument("backend must be 'auto', 'host' or 'cuda', got %r" % (kind,), op="get_backend")
    if kind == "auto":
        try:
            return get_backend("cuda", device)
        except VmemUnsupported:
            return get_backend("host")
    key = (kind, device if kind == "cuda" else -1)
    with _lock:
        b = _backends.get(key)
        if b is None:
            b = _backends[key] = Backend(kind, key[1] if kind == "cuda" else 0)
        return b


def _forget_backends_in_child() -> None:
    global _lock
    _lock = threading.Lock()    # a parent's thread may have held it at fork time
    _backends.clear()           # the parent's: get_backend in the child opens fresh ones


_fork.on_fork_child(_forget_backends_in_child)


def cuda_available(device: int = 0) -> bool:
    """True when the cuda backend can run on ``device`` here."""
    try:
        get_backend("cuda", device)
        return True
    except VmemUnsupported:
        return False


__all__ = ["Backend", "Reservation", "PagePool", "AsyncMapper", "Budget", "Lease", "budget_path", "get_backend",
           "cuda_available"]
