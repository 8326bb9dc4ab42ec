"""The fused CPU decode kernel behind the reference (Note [CPU decode attention], vmem/_native/attn_cpu.c).

One query token per request; each KV head's GQA group of query heads reads each K/V row once, with an
online softmax in float32. K/V are read in place through data pointers and element strides (no copy):

    row r = rows[b], L = ends[b]:   k_nhd[r, 0:L, h, :]  read;   k_nhd[r, L:, h, :]  never touched

Used by ``reference_flash_attn_with_kvcache`` when q and the caches are CPU float32 / float16 / bfloat16
tensors, head_dim <= 256 and the CPU has AVX-512F (the kernel's fast paths); anything else keeps the SDPA
path. The portable C path is correct but measured 4-8x slower than SDPA (b32/4k, 1 thread: 560-800 ms
vs 100-390 ms), so it serves the tests and the C API, not the reference. ``VMEM_CPU_DECODE=0`` in the
environment turns the kernel off (read at import).
"""
from __future__ import annotations

import functools
import os

import torch

MAX_HEAD_DIM = 256
ENABLED = os.environ.get("VMEM_CPU_DECODE", "1") != "0"

_lib = _ffi = None
_DTYPES = {}


def _native():
    global _lib, _ffi
    if _lib is None:
        from vmem._native import ffi, lib
        _ffi, _lib = ffi, lib
        _DTYPES.update({torch.float32: lib.VMEM_ATTN_F32, torch.float16: lib.VMEM_ATTN_F16,
                        torch.bfloat16: lib.VMEM_ATTN_BF16})
    return _ffi, _lib


PATHS = ("auto", "avx512", "portable")       # what a caller may ask for: best, no bf16 dot products, scalar


def _flags(lib, path: str) -> int:
    return {"auto": 0, "avx512": lib.VMEM_ATTN_NO_BF16_DOT, "portable": lib.VMEM_ATTN_PORTABLE}[path]


def kernel_path(head_dim: int, path: str = "auto") -> str:
    """The path the kernel takes on this machine for head_dim when asked for ``path`` (one of PATHS):
    "avx512_bf16" (AVX-512 with bf16 dot products for bf16), "avx512" or "portable"."""
    ffi, lib = _native()
    got = lib.vmem_attn_decode_path(head_dim, _flags(lib, path))
    return {lib.VMEM_ATTN_PATH_AVX512_BF16: "avx512_bf16", lib.VMEM_ATTN_PATH_AVX512: "avx512"}.get(got, "portable")


@functools.lru_cache(maxsize=None)
def fast(head_dim: int) -> bool:
    """Whether the kernel has a vector path for head_dim on this CPU (False without the native layer)."""
    try:
        return 0 < head_dim <= MAX_HEAD_DIM and kernel_path(head_dim) != "portable"
    except ImportError:
        return False


def usable(q: torch.Tensor, k_nhd: torch.Tensor) -> bool:
    """Whether the reference should call decode_attention (q [batch, 1, Hq, D]; caches checked by the caller)."""
    return (ENABLED and q.device.type == "cpu" and k_nhd.device.type == "cpu" and q.shape[1] == 1
            and q.dtype in (torch.float32, torch.float16, torch.bfloat16) and fast(q.shape[3]))


def _args(ffi, lib, q, k_nhd, v_nhd, ends, rows, scale, out, num_threads, path, split_keys):
    """The vmem_attn_decode_t of a call, and the tensors its pointers keep alive."""
    batch, _, num_heads, head_dim = q.shape
    q3 = q.reshape(batch, num_heads, head_dim).contiguous()
    ends_t = torch.as_tensor(ends, dtype=torch.int64).contiguous()
    rows_t = torch.as_tensor(rows, dtype=torch.int64).contiguous()
    a = ffi.new("vmem_attn_decode_t *")
    a.q, a.k_cache, a.v_cache, a.out = (ffi.cast("void *", t.data_ptr()) for t in (q3, k_nhd, v_nhd, out))
    a.seqlens = ffi.cast("int64_t *", ends_t.data_ptr())
    a.rows = ffi.cast("int64_t *", rows_t.data_ptr())
    a.q_stride_b, a.q_stride_h = q3.stride(0), q3.stride(1)
    a.k_stride_b, a.k_stride_s, a.k_stride_h = k_nhd.stride()[:3]
    a.v_stride_b, a.v_stride_s, a.v_stride_h = v_nhd.stride()[:3]
    a.out_stride_b, a.out_stride_h = out.stride(0), out.stride(2)
    a.dtype = _DTYPES[q.dtype]
    a.batch, a.num_heads, a.num_kv_heads, a.head_dim = batch, num_heads, k_nhd.shape[2], head_dim
    a.num_threads = max(1, torch.get_num_threads() if num_threads is None else num_threads)
    a.flags = _flags(lib, path)
    a.scale = scale
    a.split_keys = split_keys
    return a, (q3, ends_t, rows_t)


def decode_attention(q: torch.Tensor, k_nhd: torch.Tensor, v_nhd: torch.Tensor, ends, rows, scale: float,
                     out: torch.Tensor, num_threads: int | None = None, path: str = "auto",
                     split_keys: int = 0) -> bool:
    """out[b, 0] = attention of q[b, 0] over k_nhd / v_nhd[rows[b], :ends[b]]; False if the kernel declined.

    q, out:       [batch, 1, num_heads, head_dim], CPU, float32 / float16 / bfloat16; out contiguous
    k_nhd, v_nhd: [batch_cache, seqlen_cache, num_kv_heads, head_dim] views (any strides, last dim
                  contiguous), q's dtype
    ends, rows:   [batch] ints: keys to read, cache row, per request (validated by the caller)
    num_threads:  default torch.get_num_threads();  path: one of PATHS, to force a slower path (tests)
    split_keys:   0: the kernel splits the work; > 0: every request's keys cut into chunks this long (tests)
    """
    try:
        ffi, lib = _native()
    except ImportError:                      # the native layer is not built: SDPA does the work
        return False
    a, _keep = _args(ffi, lib, q, k_nhd, v_nhd, ends, rows, scale, out, num_threads, path, split_keys)
    return lib.vmem_attn_decode(a) == lib.VMEM_OK


def decode_plan(q: torch.Tensor, k_nhd: torch.Tensor, v_nhd: torch.Tensor, ends, rows,
                num_threads: int | None = None, split_keys: int = 0) -> dict:
    """How decode_attention would divide this call (arguments as there; nothing is read but shapes,
    strides and ends): num_threads, heads_per_item, chunk_keys (0: no context split), num_items,
    max_item_work and total_work in (key, KV head) pairs. Raises VmemInvalidArgument for bad arguments."""
    from vmem.errors import VmemInvalidArgument
    ffi, lib = _native()
    a, _keep = _args(ffi, lib, q, k_nhd, v_nhd, ends, rows, 1.0, q, num_threads, "auto", split_keys)
    p = ffi.new("vmem_attn_plan_t *")
    if lib.vmem_attn_decode_plan(a, p) != lib.VMEM_OK:
        raise VmemInvalidArgument("decode_plan: arguments the kernel refuses", op="vmem_attn_decode_plan")
    return {name: int(getattr(p, name)) for name in ("num_threads", "heads_per_item", "chunk_keys", "num_items",
                                                      "max_item_work", "total_work")}
