"""The vLLM-style paged reference: append into blocks, gather through the block table, then SDPA.

    position p of request b  ->  block block_table[b, p // block_size], offset p % block_size

    block_table[b] = [ 7, 2, 9, ...]        k_pool[7] = tokens [0, 16), k_pool[2] = [16, 32), ...
    keys read: blocks [0, ceil(L_b / block_size)) gathered into one dense [L_b, Hkv, D] copy

Requests with the same length share one gather and one SDPA call. The gather is the price a
kernel that cannot read paged memory pays; fused paged kernels (vLLM, FlashInfer) avoid the copy but
not the indirection. This is the honest pure-PyTorch baseline the contiguous cache is measured against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vmem.attention._common import (
    attend, check_cache_pair, check_heads, check_new_kv, check_q, default_scale, fail, seqlens_list,
)


def paged_attention_with_kvcache(q, k_pool, v_pool, block_table, k=None, v=None, cache_seqlens=None,
                                 softmax_scale=None, causal=True):
    """Append k/v through the block table, then attend over ``[0, cache_seqlens[b] + seqlen_new)``.

    q:            [batch, seqlen_q, num_heads, head_dim], float32 / float16 / bfloat16
    k_pool, v_pool: [num_blocks, block_size, num_kv_heads, head_dim], q's dtype; written in place.
    block_table:  [batch, max_blocks_per_seq] int32 (or int64): physical block of each logical block.
    k, v:         [batch, seqlen_new, num_kv_heads, head_dim] or None.
    cache_seqlens: int or [batch] int32, tokens already cached (required with k/v; None = all blocks).
    Returns out [batch, seqlen_q, num_heads, head_dim] in q's dtype. Causal is bottom-right aligned.
    Raises VmemInvalidArgument (nothing written) for bad shapes, block ids or lengths.
    """
    batch, seqlen_q, num_heads, head_dim = check_q(q)
    check_cache_pair("pool", k_pool, v_pool, q)
    num_blocks, block_size, num_kv_heads, pool_head_dim = k_pool.shape
    check_heads(num_heads, num_kv_heads, head_dim, pool_head_dim)
    if (not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != batch
            or block_table.dtype not in (torch.int32, torch.int64)):
        fail("block_table must be a [batch=%d, max_blocks_per_seq] int32 tensor, got %s", batch,
             "%s %s" % (block_table.dtype, tuple(block_table.shape)) if isinstance(block_table, torch.Tensor)
             else type(block_table).__name__)
    max_tokens = block_table.shape[1] * block_size
    seqlen_new = check_new_kv(k, v, batch, num_kv_heads, head_dim, q)
    if seqlen_new and cache_seqlens is None:
        fail("cache_seqlens is required when k and v are appended")
    seqlens = seqlens_list(cache_seqlens, batch, max_tokens)
    ends = [s + seqlen_new for s in seqlens]
    if max(ends) > max_tokens:
        b = ends.index(max(ends))
        fail("request %d would hold %d tokens but its block table row covers %d (%d blocks of %d)",
             b, ends[b], max_tokens, block_table.shape[1], block_size)
    table = block_table.to(device=q.device, dtype=torch.int64)
    blocks_needed = [-(-e // block_size) for e in ends]
    in_use = torch.arange(table.shape[1], device=q.device) < torch.tensor(blocks_needed, device=q.device)[:, None]
    used = table[in_use]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
        fail("block_table holds block ids outside [0, %d) in the part in use", num_blocks)
    scale = default_scale(head_dim, softmax_scale)
    if seqlen_new:
        pos = torch.tensor(seqlens, dtype=torch.int64, device=q.device).unsqueeze(1) \
            + torch.arange(seqlen_new, device=q.device)                          # [batch, seqlen_new]
        blk = table.gather(1, pos // block_size)
        off = pos % block_size
        flat = (blk * block_size + off).reshape(-1)
        if flat.unique().numel() < flat.numel():
            fail("two requests write the same (block, offset); block tables must not share written blocks")
        k_pool.index_put_((blk, off), k)
        v_pool.index_put_((blk, off), v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    groups: dict[int, list[int]] = {}
    for b, e in enumerate(ends):
        groups.setdefault(e, []).append(b)
    if seqlen_q == 1:                    # decode: fold the GQA group into query rows (as the vmem path)
        q_rows = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
        out_rows = out.view(q_rows.shape)
    for num_keys, members in groups.items():
        n, nb = len(members), blocks_needed[members[0]]
        if n == 1:
            b = members[0]
            ids = table[b, :nb]
        else:
            idx = torch.tensor(members, dtype=torch.int64, device=q.device)
            ids = table.index_select(0, idx)[:, :nb].reshape(-1)
        key = k_pool.index_select(0, ids).view(n, nb * block_size, num_kv_heads, head_dim)[:, :num_keys]
        value = v_pool.index_select(0, ids).view(n, nb * block_size, num_kv_heads, head_dim)[:, :num_keys]
        key, value = key.transpose(1, 2), value.transpose(1, 2)             # [n, Hkv, L, D]
        if n == 1 and seqlen_q == 1 and num_keys:
            out_rows[b:b + 1] = F.scaled_dot_product_attention(q_rows[b:b + 1], key, value, scale=scale)
        elif n == 1:
            out[b:b + 1] = attend(q[b:b + 1], key, value, causal, scale)
        else:
            out.index_copy_(0, idx, attend(q.index_select(0, idx), key, value, causal, scale))
    return out

