"""Load the native extension and refuse a build whose version stamp differs from the package's."""
from __future__ import annotations

import numpy as np

from vmem._version import __version__

try:
    from vmem._native._vmem_cffi import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "vmem's native extension vmem._native._vmem_cffi is not built (%s); run "
        "`pip install -e . --no-build-isolation` (or `make test`) in the source tree" % exc
    ) from exc

NATIVE_VERSION = ffi.string(lib.vmem_version()).decode()
if NATIVE_VERSION != __version__:
    raise ImportError(
        "vmem's native extension is stale: it was built for version %s but the package is %s; "
        "rebuild with `pip install -e . --no-build-isolation`" % (NATIVE_VERSION, __version__)
    )


_I64 = np.dtype(np.int64)


def as_pages(pages, name: str) -> np.ndarray:
    """Page indices as a contiguous int64 array ``[n]`` (accepts ints, sequences, numpy, torch)."""
    if type(pages) is np.ndarray and pages.dtype is _I64 and pages.flags.c_contiguous:
        arr = pages
    elif hasattr(pages, "detach") and hasattr(pages, "cpu"):  # torch.Tensor without importing torch
        arr = np.ascontiguousarray(pages.detach().cpu().numpy(), dtype=np.int64)
    else:
        try:
            arr = np.ascontiguousarray(pages, dtype=np.int64)
        except OverflowError as exc:  # an int beyond int64: no page has that index
            from vmem.errors import VmemInvalidArgument

            raise VmemInvalidArgument("%s: page index out of the int64 range (%s)" % (name, exc), op=name) from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        from vmem.errors import VmemInvalidArgument

        raise VmemInvalidArgument("%s must be one-dimensional, got shape %s" % (name, arr.shape), op=name)
    return arr

