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
    """Page indices as a contiguous int64 array ``[n]`` (accepts ints, sequences, numpy, torch).

    Integers only: floats, bools and strings raise VmemInvalidArgument (``int64`` conversion would
    truncate 1.7 to page 1 or parse "1").
    """
    if type(pages) is np.ndarray and pages.dtype is _I64 and pages.flags.c_contiguous:
        arr = pages
    else:
        if hasattr(pages, "detach") and hasattr(pages, "cpu"):  # torch.Tensor without importing torch
            pages = pages.detach().cpu().numpy()
        arr = _int64_pages(pages, name)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        _bad_pages(name, "must be one-dimensional, got shape %s" % (arr.shape,))
    return arr


def _int64_pages(pages, name: str) -> np.ndarray:
    try:
        raw = np.asarray(pages)
    except ValueError as exc:          # ragged sequences and the like
        _bad_pages(name, "page indices must be integers (%s)" % exc)
    if raw.size and raw.dtype.kind not in "iuO":
        _bad_pages(name, "page indices must be integers, got %s" % raw.dtype)
    if raw.dtype.kind == "O" and not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool)
                                          for x in raw.reshape(-1)):
        _bad_pages(name, "page indices must be integers")
    if raw.dtype == np.uint64 and raw.size and raw.max() > np.iinfo(np.int64).max:
        _bad_pages(name, "page index out of the int64 range (%d)" % raw.max())
    try:
        return np.ascontiguousarray(raw, dtype=np.int64)
    except OverflowError as exc:       # an int beyond int64: no page has that index
        _bad_pages(name, "page index out of the int64 range (%s)" % exc)


def _bad_pages(name: str, why: str):
    from vmem.errors import VmemInvalidArgument

    raise VmemInvalidArgument("%s: %s" % (name, why), op=name) from None
