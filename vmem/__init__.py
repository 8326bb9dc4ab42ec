"""vmem: an OS-style virtual-memory manager for LLM KV caches.

Layers, bottom up (docs/structure.md): native (C) -> backends -> attention -> allocator -> engine -> server;
each imports only the layers below it.
Importing vmem loads the native extension and checks its version stamp.
"""
from vmem._version import __version__
from vmem.backends import AsyncMapper, Backend, PagePool, Reservation, get_backend
from vmem.errors import (VmemBusyError, VmemClosedError, VmemDriverError, VmemError, VmemForkedError,
                         VmemIntegrityError, VmemInvalidArgument, VmemMapLimitError, VmemOutOfMemory,
                         VmemSlotError, VmemUnsupported)

__all__ = [
    "__version__", "get_backend", "Backend", "Reservation", "PagePool", "AsyncMapper",
    "VmemError", "VmemOutOfMemory", "VmemMapLimitError", "VmemInvalidArgument", "VmemDriverError",
    "VmemClosedError", "VmemUnsupported", "VmemBusyError", "VmemForkedError", "VmemIntegrityError", "VmemSlotError",
]
