"""Zero-copy torch tensors over a reservation's virtual range.

CPU: an object exporting ``__array_interface__`` -> numpy array (its ``.base``) -> ``torch.from_numpy``.
CUDA: an object exporting ``__cuda_array_interface__`` -> ``torch.as_tensor`` (the deleter holds it).
Either way the exporter holds the Reservation, so the range outlives every view; the reservation counts
live exporters and releases the range only when ``close()`` was called and the last one is gone.
"""
from __future__ import annotations

import torch

from vmem.errors import VmemInvalidArgument


class _RangeOwner:
    """Exports ``[address, address + num_bytes)`` as bytes and keeps ``resv`` alive."""

    def __init__(self, resv, address: int, num_bytes: int, cuda: bool):
        resv._view_born()  # first: raises VmemClosedError if a close() won the race, and then __del__ has nothing
        self._resv = resv
        iface = {"shape": (num_bytes,), "typestr": "|u1", "data": (address, False), "version": 3}
        if cuda:
            iface["strides"] = None
            iface["stream"] = None  # no synchronisation: the bytes are not produced on a stream
            self.__cuda_array_interface__ = iface
        else:
            self.__array_interface__ = iface

    def __del__(self):
        resv = getattr(self, "_resv", None)
        if resv is not None:
            self._resv = None
            resv._view_died()


def _contiguous_strides(shape):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def make_view(resv, dtype, shape, offset_bytes: int = 0, strides=None) -> torch.Tensor:
    """``shape`` of ``dtype`` at ``resv.address + offset_bytes``; ``strides`` in elements (default: C order)."""
    if not isinstance(dtype, torch.dtype):
        raise VmemInvalidArgument("dtype must be a torch.dtype, got %r" % (dtype,), op="tensor")
    try:
        shape = tuple(int(s) for s in shape)
        offset_bytes = int(offset_bytes)
        strides = _contiguous_strides(shape) if strides is None else tuple(int(s) for s in strides)
    except (TypeError, ValueError) as exc:
        raise VmemInvalidArgument("shape, strides and offset_bytes must be ints: %s" % exc, op="tensor") from None
    itemsize = dtype.itemsize
    if len(strides) != len(shape) or any(s < 0 for s in shape) or any(s < 0 for s in strides):
        raise VmemInvalidArgument("bad shape %s / strides %s" % (shape, strides), op="tensor")
    if offset_bytes < 0 or offset_bytes % itemsize:
        raise VmemInvalidArgument("offset_bytes=%d must be >= 0 and a multiple of the item size %d"
                                  % (offset_bytes, itemsize), op="tensor")
    numel_span = 0 if 0 in shape else 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    span_bytes = numel_span * itemsize
    if offset_bytes + span_bytes > resv.num_bytes:
        raise VmemInvalidArgument(
            "view of %d bytes at offset %d does not fit the reservation's %d bytes"
            % (span_bytes, offset_bytes, resv.num_bytes), op="tensor")
    resv._handle("tensor")  # raises VmemClosedError after close()
    cuda = resv.backend.name == "cuda"
    owner = _RangeOwner(resv, resv.address + offset_bytes, max(span_bytes, itemsize), cuda)
    if cuda:
        raw = torch.as_tensor(owner, device=resv.backend.device)
    else:
        import numpy as np

        raw = torch.from_numpy(np.asarray(owner))
    return raw.view(dtype).as_strided(shape, strides)
