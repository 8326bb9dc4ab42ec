"""The test oracle: attention written out in float32, no fusion, no cleverness."""
from __future__ import annotations

import torch

from vmem.attention._common import check_heads, check_q, default_scale, fail


def naive_attention(q, k, v, causal=True, softmax_scale=None):
    """softmax(q k^T * scale + mask) v, computed in float32.

    q: [batch, seqlen_q, num_heads, head_dim]; k, v: [batch, seqlen_k, num_kv_heads, head_dim] (same dtype).
    Causal mask aligned to the bottom-right: query i sees keys j <= i + seqlen_k - seqlen_q; rows that
    see no key give zeros. GQA: query head h uses KV head h // (num_heads // num_kv_heads).
    Returns [batch, seqlen_q, num_heads, head_dim] in q's dtype.
    """
    batch, seqlen_q, num_heads, head_dim = check_q(q)
    for label, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != batch:
            fail("%s must be [batch=%d, seqlen_k, num_kv_heads, head_dim]", label, batch)
    if k.shape != v.shape:
        fail("k and v shapes differ: %s vs %s", tuple(k.shape), tuple(v.shape))
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    check_heads(num_heads, num_kv_heads, head_dim, k.shape[3])
    group = num_heads // num_kv_heads
    scale = default_scale(head_dim, softmax_scale)
    qf = q.float().transpose(1, 2)                                              # [B, Hq, Sq, D]
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)              # [B, Hq, Sk, D]
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale                    # [B, Hq, Sq, Sk]
    if causal:
        i = torch.arange(seqlen_q, device=q.device).unsqueeze(1)
        j = torch.arange(seqlen_k, device=q.device).unsqueeze(0)
        scores = scores.masked_fill(j > i + (seqlen_k - seqlen_q), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)                       # empty rows -> 0
    return torch.matmul(probs, vf).transpose(1, 2).to(q.dtype)
