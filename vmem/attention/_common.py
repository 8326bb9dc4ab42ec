"""Shared pieces of the attention entry points: argument checks and the SDPA core.

Shapes used throughout (glossary: docs/glossary.md)::

    q        [batch, seqlen_q, num_heads, head_dim]
    k, v     [batch, seqlen_new, num_kv_heads, head_dim]          (new tokens to append)
    key/val  [n, num_kv_heads, seqlen_k, head_dim]                 (what one SDPA call reads; any strides,
                                                                    last dim contiguous)

GQA: query head h reads KV head h // group (group = num_heads // num_kv_heads), as in FlashAttention.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vmem.errors import VmemInvalidArgument

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fail(message: str, *args) -> None:
    raise VmemInvalidArgument(message % args if args else message, op="attention")


def check_q(q: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, seqlen_q, num_heads, head_dim) of q, or VmemInvalidArgument."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        fail("q must be a 4-D tensor [batch, seqlen_q, num_heads, head_dim], got %s", _shape(q))
    if q.dtype not in FLOAT_DTYPES:
        fail("q has dtype %s; expected float32, float16 or bfloat16", q.dtype)
    batch, seqlen_q, num_heads, head_dim = q.shape
    if batch == 0 or seqlen_q == 0 or num_heads == 0 or head_dim == 0:
        fail("q has an empty dimension: shape %s", tuple(q.shape))
    return batch, seqlen_q, num_heads, head_dim


def check_cache_pair(name: str, k_cache, v_cache, q: torch.Tensor) -> None:
    for label, t in (("k_" + name, k_cache), ("v_" + name, v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            fail("%s must be a 4-D tensor, got %s", label, _shape(t))
        if t.dtype != q.dtype:
            fail("%s has dtype %s but q has %s; they must match", label, t.dtype, q.dtype)
        if t.device != q.device:
            fail("%s is on %s but q is on %s", label, t.device, q.device)
        if t.stride(-1) != 1:
            fail("%s must have a contiguous last dimension (stride(-1) == 1), got strides %s", label, t.stride())
    if k_cache.shape != v_cache.shape:
        fail("k_%s and v_%s shapes differ: %s vs %s", name, name, tuple(k_cache.shape), tuple(v_cache.shape))


def check_heads(num_heads: int, num_kv_heads: int, head_dim: int, cache_head_dim: int) -> None:
    if cache_head_dim != head_dim:
        fail("head_dim of q (%d) and of the cache (%d) differ", head_dim, cache_head_dim)
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        fail("num_heads of q (%d) must be a multiple of the cache's num_kv_heads (%d)", num_heads, num_kv_heads)


def check_new_kv(k, v, batch: int, num_kv_heads: int, head_dim: int, q: torch.Tensor) -> int:
    """seqlen_new of the appended k/v (0 when both are None)."""
    if k is None and v is None:
        return 0
    if k is None or v is None:
        fail("k and v must be given together (one of them is None)")
    for label, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            fail("%s must be a 4-D tensor [batch, seqlen_new, num_kv_heads, head_dim], got %s", label, _shape(t))
        if t.dtype != q.dtype or t.device != q.device:
            fail("%s must have q's dtype and device (%s on %s), got %s on %s", label, q.dtype, q.device,
                 t.dtype, t.device)
    if k.shape != v.shape:
        fail("k and v shapes differ: %s vs %s", tuple(k.shape), tuple(v.shape))
    if k.shape[0] != batch or k.shape[2] != num_kv_heads or k.shape[3] != head_dim:
        fail("k must be [batch=%d, seqlen_new, num_kv_heads=%d, head_dim=%d], got %s", batch, num_kv_heads,
             head_dim, tuple(k.shape))
    if k.shape[1] == 0:
        fail("k and v have seqlen_new == 0; pass None to append nothing")
    return int(k.shape[1])


def seqlens_list(cache_seqlens, batch: int, default: int) -> list[int]:
    """cache_seqlens (None, int, or [batch] integer tensor / sequence) as a list of ints >= 0."""
    if cache_seqlens is None:
        return [default] * batch
    if isinstance(cache_seqlens, bool):
        fail("cache_seqlens must be an int or a [batch] integer tensor, got a bool")
    if isinstance(cache_seqlens, int):
        values = [cache_seqlens] * batch
    else:
        t = torch.as_tensor(cache_seqlens)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() > 1:
            fail("cache_seqlens must be an int or a [batch] integer tensor, got %s %s", t.dtype, tuple(t.shape))
        if t.dim() == 0:
            values = [int(t)] * batch
        else:
            if t.shape[0] != batch:
                fail("cache_seqlens has %d entries but q has batch %d", t.shape[0], batch)
            values = t.tolist()
    if any(x < 0 for x in values):
        fail("cache_seqlens must be >= 0, got %s", min(values))
    return values


def attend(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """Attention of q over key/value, causal mask aligned to the bottom-right corner.

    q: [n, seqlen_q, num_heads, head_dim]; key, value: [n, num_kv_heads, seqlen_k, head_dim] (any strides,
    read in place). Returns [n, seqlen_q, num_heads, head_dim] in q.dtype. Query rows with no key to see
    (seqlen_q > seqlen_k under causal) give zeros, as FlashAttention does.
    """
    n, seqlen_q, num_heads, head_dim = q.shape
    num_kv_heads, seqlen_k = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    if seqlen_k == 0:
        return q.new_zeros(q.shape)
    if causal and seqlen_q > seqlen_k:          # the first rows see nothing
        out = q.new_zeros(q.shape)
        out[:, seqlen_q - seqlen_k:] = attend(q[:, seqlen_q - seqlen_k:], key, value, causal, scale)
        return out
    if seqlen_q == 1 or not causal:
        # Fold the query heads of one KV head into the query rows: [n, Hkv, group * seqlen_q, D]. Every
        # row sees every key (no mask), so one SDPA call reads each KV head once.
        qf = q.reshape(n, seqlen_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        qf = qf.reshape(n, num_kv_heads, group * seqlen_q, head_dim)
        o = F.scaled_dot_product_attention(qf, key, value, scale=scale)
        o = o.view(n, num_kv_heads, group, seqlen_q, head_dim).permute(0, 3, 1, 2, 4)
        return o.reshape(n, seqlen_q, num_heads, head_dim)
    # Causal with several query rows: one call per member of the GQA group, so the mask stays
    # [seqlen_q, seqlen_k] (or none at all when the square case lets SDPA skip masked blocks).
    mask = None
    if seqlen_k != seqlen_q:
        offset = seqlen_k - seqlen_q
        rows = torch.arange(seqlen_q, device=q.device).unsqueeze(1)
        mask = torch.arange(seqlen_k, device=q.device).unsqueeze(0) <= rows + offset
    out = torch.empty(n, seqlen_q, num_kv_heads, group, head_dim, dtype=q.dtype, device=q.device)
    q5 = q.view(n, seqlen_q, num_kv_heads, group, head_dim) if q.is_contiguous() else \
        q.reshape(n, seqlen_q, num_kv_heads, group, head_dim)
    for g in range(group):
        qg = q5[:, :, :, g].transpose(1, 2)                          # [n, Hkv, seqlen_q, D]
        o = F.scaled_dot_product_attention(qg, key, value, attn_mask=mask, is_causal=mask is None, scale=scale)
        out[:, :, :, g] = o.transpose(1, 2)
    return out.view(n, seqlen_q, num_heads, head_dim)


def default_scale(head_dim: int, softmax_scale) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    try:
        scale = float(softmax_scale)
    except (TypeError, ValueError):
        fail("softmax_scale must be a number, got %r", softmax_scale)
    if not math.isfinite(scale):
        fail("softmax_scale must be finite, got %r", softmax_scale)
    return scale


def _shape(t) -> str:
    return "shape %s" % (tuple(t.shape),) if isinstance(t, torch.Tensor) else type(t).__name__
