"""``flash_attn_with_kvcache`` over contiguous (virtual) K/V tensors.

On CUDA with flash-attn installed and the NHD layout, the real FlashAttention kernel runs unchanged.
Everywhere else a reference built on ``torch.nn.functional.scaled_dot_product_attention`` runs over
zero-copy views of the cache:

    row r = cache_batch_idx[b], L_b = cache_seqlens[b] + seqlen_new

    k_cache[r]   |0 ........ cache_seqlens[b] | new k[b] | ...... unread ...... | max_seq
                 [------------- read: [0, L_b) ---------)[ never touched      )

Rows are sorted; each run of consecutive rows with the same L_b becomes one batched SDPA call over
the slice ``k_cache[r0:r1, :L]`` (a view, no copy); decode on the CPU (seqlen_q == 1) runs the fused
kernel of cpu_decode.py instead (Note [CPU decode attention]), with SDPA as its fallback. Nothing at or
past L_b is read, so on CUDA those pages may stay unmapped. Plan vs run: everything here is "run" (no
driver calls); the reference reads ``cache_seqlens`` on the host, which synchronises a CUDA stream.
"""
from __future__ import annotations

import importlib
import logging

import torch
import torch.nn.functional as F

from vmem.attention import cpu_decode
from vmem.attention._common import (
    attend, check_cache_pair, check_heads, check_new_kv, check_q, default_scale, fail, seqlens_list,
)
from vmem.errors import VmemUnsupported

logger = logging.getLogger(__name__)

KV_LAYOUTS = ("NHD", "HND")

_flash_fn = None
_flash_probed = False


def flash_attn_available() -> bool:
    """True when ``flash_attn.flash_attn_with_kvcache`` can be imported (CUDA builds only)."""
    global _flash_fn, _flash_probed
    if not _flash_probed:
        _flash_probed = True
        try:
            _flash_fn = importlib.import_module("flash_attn").flash_attn_with_kvcache
        except Exception as exc:       # ImportError, or a CUDA extension that fails to load
            logger.debug("flash-attn not usable: %s", exc)
            _flash_fn = None
    return _flash_fn is not None


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, cache_batch_idx=None,
                            softmax_scale=None, causal=True, kv_layout="NHD", **flash_kwargs):
    """Append k/v into the cache in place, then attend over ``[0, cache_seqlens[b] + seqlen_new)``.

    FlashAttention semantics (flash_attn/flash_attn_interface.py), except that ``causal`` defaults to
    True (the engine's case):

    q:               [batch, seqlen_q, num_heads, head_dim], float32 / float16 / bfloat16
    k_cache, v_cache: NHD [batch_cache, seqlen_cache, num_kv_heads, head_dim] or
                     HND [batch_cache, num_kv_heads, seqlen_cache, head_dim]; q's dtype; any strides with
                     a contiguous last dim (layer-group views work). Written in place when k/v are given.
    k, v:            [batch, seqlen_new, num_kv_heads, head_dim] or None; written at positions
                     ``cache_seqlens[b] ...`` of row ``cache_batch_idx[b]``. Needs ``cache_seqlens``.
    cache_seqlens:   int or [batch] int32: tokens already in each row (before the append). None means
                     the whole seqlen_cache.
    cache_batch_idx: [batch] int32 cache rows (default arange(batch)); unique when k/v are given.
    softmax_scale:   default 1 / sqrt(head_dim).
    causal:          mask aligned to the bottom-right corner: query i sees keys
                     ``j <= i + seqlen_k - seqlen_q``. Query heads ``h`` read KV head ``h // group``.
    kv_layout:       "NHD" or "HND" (the real kernel takes NHD only).
    flash_kwargs:    passed to the real kernel (rotary_cos, window_size, ...); the reference rejects them.
    Returns out [batch, seqlen_q, num_heads, head_dim] in q's dtype.
    Raises VmemInvalidArgument for bad shapes, dtypes, indices or lengths, before anything is written.
    """
    if kv_layout not in KV_LAYOUTS:
        fail("kv_layout must be one of %s, got %r", KV_LAYOUTS, kv_layout)
    if (kv_layout == "NHD" and isinstance(q, torch.Tensor) and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available()):
        # the kernel wants int32 index tensors on the GPU; engines often keep them on the host
        if isinstance(cache_seqlens, torch.Tensor):
            cache_seqlens = cache_seqlens.to(device=q.device, dtype=torch.int32)
        if isinstance(cache_batch_idx, torch.Tensor):
            cache_batch_idx = cache_batch_idx.to(device=q.device, dtype=torch.int32)
        return _flash_fn(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                         cache_batch_idx=cache_batch_idx, softmax_scale=softmax_scale, causal=causal,
                         **flash_kwargs)
    if flash_kwargs:
        raise VmemUnsupported("the SDPA reference does not implement %s (needs flash-attn on CUDA)"
                              % sorted(flash_kwargs), op="attention")
    return reference_flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx,
                                             softmax_scale, causal, kv_layout)


def reference_flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None,
                                      cache_batch_idx=None, softmax_scale=None, causal=True, kv_layout="NHD"):
    """The SDPA reference behind flash_attn_with_kvcache (same arguments), on any device."""
    if kv_layout not in KV_LAYOUTS:
        fail("kv_layout must be one of %s, got %r", KV_LAYOUTS, kv_layout)
    batch, seqlen_q, num_heads, head_dim = check_q(q)
    check_cache_pair("cache", k_cache, v_cache, q)
    k_nhd = k_cache if kv_layout == "NHD" else k_cache.transpose(1, 2)      # a view either way
    v_nhd = v_cache if kv_layout == "NHD" else v_cache.transpose(1, 2)
    batch_cache, seqlen_cache, num_kv_heads, cache_head_dim = k_nhd.shape
    check_heads(num_heads, num_kv_heads, head_dim, cache_head_dim)
    seqlen_new = check_new_kv(k, v, batch, num_kv_heads, head_dim, q)
    if seqlen_new and cache_seqlens is None:
        fail("cache_seqlens is required when k and v are appended")
    seqlens = seqlens_list(cache_seqlens, batch, seqlen_cache)
    rows = _rows(cache_batch_idx, batch, batch_cache)
    ends = [s + seqlen_new for s in seqlens]
    longest = max(ends)
    if longest > seqlen_cache:
        b = ends.index(longest)
        fail("row %d would hold %d tokens (cache_seqlens %d + seqlen_new %d) but seqlen_cache is %d",
             rows[b], longest, seqlens[b], seqlen_new, seqlen_cache)
    scale = default_scale(head_dim, softmax_scale)
    if seqlen_new:
        if len(set(rows)) != batch:
            fail("cache_batch_idx has duplicate rows; appending k/v needs one row per batch entry")
        _append(k_nhd, v_nhd, k, v, rows, seqlens, q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if cpu_decode.usable(q, k_nhd) and cpu_decode.decode_attention(q, k_nhd, v_nhd, ends, rows, scale, out):
        return out                           # fused CPU decode kernel (Note [CPU decode attention])
    k_hnd, v_hnd = k_nhd.transpose(1, 2), v_nhd.transpose(1, 2)        # [batch_cache, Hkv, seqlen, D] views
    if seqlen_q == 1:
        # decode: the group's query heads become the query rows of one KV head, no mask needed
        q_rows = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
        out_rows = out.view(q_rows.shape)
    for members, row0, num_keys in _runs(rows, ends):
        n, b0 = len(members), members[0]
        key = k_hnd[row0:row0 + n, :, :num_keys]                        # [n, Hkv, L, D], a view
        value = v_hnd[row0:row0 + n, :, :num_keys]
        in_order = n == 1 or members == list(range(b0, b0 + n))
        if seqlen_q == 1 and in_order and num_keys:
            out_rows[b0:b0 + n] = F.scaled_dot_product_attention(q_rows[b0:b0 + n], key, value, scale=scale)
        elif in_order:
            out[b0:b0 + n] = attend(q[b0:b0 + n], key, value, causal, scale)
        else:
            idx = torch.tensor(members, dtype=torch.int64, device=q.device)
            out.index_copy_(0, idx, attend(q.index_select(0, idx), key, value, causal, scale))
    return out


def _rows(cache_batch_idx, batch: int, batch_cache: int) -> list[int]:
    if cache_batch_idx is None:
        if batch > batch_cache:
            fail("q has batch %d but the cache has only %d rows; pass cache_batch_idx", batch, batch_cache)
        return list(range(batch))
    t = torch.as_tensor(cache_batch_idx)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1 or t.shape[0] != batch:
        fail("cache_batch_idx must be a [batch=%d] integer tensor, got %s %s", batch, t.dtype, tuple(t.shape))
    rows = t.tolist()
    bad = [r for r in rows if not 0 <= r < batch_cache]
    if bad:
        fail("cache_batch_idx %d is outside the cache's rows [0, %d)", bad[0], batch_cache)
    return rows


def _append(k_nhd, v_nhd, k, v, rows: list[int], seqlens: list[int], device) -> None:
    """k_nhd[rows[b], seqlens[b] : seqlens[b] + seqlen_new] = k[b] (same for v), in place."""
    seqlen_new = k.shape[1]
    if seqlen_new == 1:                          # decode: one indexed write for the whole batch
        r = torch.tensor(rows, dtype=torch.int64, device=device)
        p = torch.tensor(seqlens, dtype=torch.int64, device=device)
        k_nhd.index_put_((r, p), k[:, 0])
        v_nhd.index_put_((r, p), v[:, 0])
        return
    for b, (row, start) in enumerate(zip(rows, seqlens)):
        k_nhd[row, start:start + seqlen_new].copy_(k[b])
        v_nhd[row, start:start + seqlen_new].copy_(v[b])


def _runs(rows: list[int], ends: list[int]):
    """(batch entries, first row, num_keys) for each run of consecutive rows with equal length.

    rows [5, 0, 1, 2], ends [9, 7, 7, 3] -> ([1, 2], 0, 7), ([3], 2, 3), ([0], 5, 9)
    """
    order = sorted(range(len(rows)), key=rows.__getitem__)
    run = [order[0]]
    for b in order[1:]:
        last = run[-1]
        if rows[b] == rows[last] + 1 and ends[b] == ends[last]:
            run.append(b)
        else:
            yield run, rows[run[0]], ends[run[0]]
            run = [b]
    yield run, rows[run[0]], ends[run[0]]
