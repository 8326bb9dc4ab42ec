"""What every Python object over a native handle shares (Reservation, PagePool, Budget, Lease): the fork
generation it belongs to (vmem.backends._fork), the open check, ``closed``, ``with``, and no copy or
pickle (a copy would share the handle, and the second close would free it again)."""
from __future__ import annotations

from vmem.backends import _fork
from vmem.errors import VmemClosedError, VmemInvalidArgument


def refuse_copy(obj, protocol=None):
    """``__reduce_ex__`` of objects that own a native handle: a copy (copy.copy, deepcopy, pickle) would
    share the handle, and the second close / finalizer would free it again (use after free, double free)."""
    raise VmemInvalidArgument("%s cannot be copied or pickled: it owns a native handle; create another one"
                              % type(obj).__name__, op="copy")


class NativeHandle:
    """Subclasses set ``self._h`` (the cffi handle, None once closed) and ``self._gen =
    _fork.generation()`` in ``__init__``, define ``close()``, and name themselves in ``_what``."""

    _what = "object"
    _h = None
    _gen = -1                    # never current: an object whose __init__ failed is unusable

    __reduce_ex__ = refuse_copy

    def _is_closed(self) -> bool:
        return self._h is None

    def _handle(self, op: str):
        """The native handle; VmemForkedError in a forked child, VmemClosedError after close()."""
        if not _fork.current(self._gen):
            _fork.refuse(self, op)
        if self._is_closed():
            raise VmemClosedError("%s: %s is closed" % (op, self._what), op=op)
        return self._h

    @property
    def closed(self) -> bool:
        return self._is_closed()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
