"""vmem: an OS-style virtual-memory manager for LLM KV caches.

Layers (docs/structure.md): native (C) -> backends -> allocator -> attention -> engine.
Importing vmem loads the native extension and checks its version stamp.
"""
from vmem._version import __version__
from vmem.backends import AsyncMapper, Backend, PagePool, Reservation, get_backend
from vmem.errors import (VmemClosedError, VmemDriverError, VmemError, VmemIntegrityError,
                         VmemInvalidArgument, VmemMapLimitError, VmemOutOfMemory, VmemSlotError,
                         VmemUnsupported)

__all__ = [
    "__version__", "get_backend", "Backend", "Reservation", "PagePool", "AsyncMapper",
    "VmemError", "VmemOutOfMemory", "VmemMapLimitError", "VmemInvalidArgument", "VmemDriverError",
    "VmemClosedError", "VmemUnsupported", "VmemIntegrityError", "VmemSlotError",
]
