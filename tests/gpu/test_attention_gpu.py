"""Attention entry points on a CUDA device (skipped without one): the real flash-attn kernel when it is
installed, else the SDPA reference on CUDA, against the float32 oracle; both over plain tensors and over
the virtual tensors of a vmem cache whose pages past each row's length stay unmapped."""

import pytest
import torch

from vmem.attention import (
    flash_attn_available, flash_attn_with_kvcache, naive_attention, paged_attention_with_kvcache,
    reference_flash_attn_with_kvcache,
)

pytestmark = pytest.mark.gpu

HQ, HKV, D = 8, 2, 64
TOL = {torch.float16: dict(atol=4e-3, rtol=4e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def oracle(q, k_hist, v_hist, rows, seqlens, k_new, v_new):
    """naive attention on the CPU, per request, over (cached history + new tokens)."""
    outs = []
    for b, (r, s) in enumerate(zip(rows, seqlens)):
        keys = torch.cat([k_hist[r, :s], k_new[b]]).cpu()
        vals = torch.cat([v_hist[r, :s], v_new[b]]).cpu()
        outs.append(naive_attention(q[b:b + 1].cpu(), keys[None], vals[None]))
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seqlen_new", [1, 9])
@pytest.mark.parametrize("impl", ["dispatch", "reference"])
def test_kvcache_attention_on_cuda(dtype, seqlen_new, impl):
    fn = flash_attn_with_kvcache if impl == "dispatch" else reference_flash_attn_with_kvcache
    g = torch.Generator(device="cuda").manual_seed(seqlen_new)
    k_cache = torch.randn(5, 256, HKV, D, device="cuda", dtype=dtype, generator=g)
    v_cache = torch.randn(5, 256, HKV, D, device="cuda", dtype=dtype, generator=g)
    k_hist, v_hist = k_cache.clone(), v_cache.clone()
    rows, seqlens = [3, 0, 1], [100, 7, 7]
    q = torch.randn(3, seqlen_new, HQ, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(3, seqlen_new, HKV, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(3, seqlen_new, HKV, D, device="cuda", dtype=dtype, generator=g)
    out = fn(q, k_cache, v_cache, k=k, v=v, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device="cuda"),
             cache_batch_idx=torch.tensor(rows, dtype=torch.int32, device="cuda"), causal=True)
    torch.cuda.synchronize()
    torch.testing.assert_close(out.cpu().float(), oracle(q, k_hist, v_hist, rows, seqlens, k, v).float(),
                               **TOL[dtype])
    for b, (r, s) in enumerate(zip(rows, seqlens)):
        assert torch.equal(k_cache[r, s:s + seqlen_new], k[b])
        assert torch.equal(v_cache[r, s:s + seqlen_new], v[b])
    print("flash-attn installed: %s" % flash_attn_available())


def test_real_kernel_and_reference_agree():
    if not flash_attn_available():
        pytest.skip("flash-attn is not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16
    k_cache = torch.randn(8, 1024, HKV, D, device="cuda", dtype=dt, generator=g)
    v_cache = torch.randn(8, 1024, HKV, D, device="cuda", dtype=dt, generator=g)
    q = torch.randn(8, 1, HQ, D, device="cuda", dtype=dt, generator=g)
    seqlens = torch.randint(1, 1000, (8,), device="cuda", dtype=torch.int32, generator=g)
    idx = torch.randperm(8, device="cuda", generator=g).to(torch.int32)
    a = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, cache_batch_idx=idx)
    b = reference_flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, cache_batch_idx=idx)
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind,layout", [("vmem", "NHD"), ("vmem", "HND"), ("paged", "NHD")])
def test_cache_attention_on_cuda_reads_only_mapped_pages(kind, layout):
    """A vmem cache maps only what step() asked for; decode through it must not fault and must match."""
    from vmem.allocator import KVCacheSpec, make_cache
    dt = torch.bfloat16
    spec = KVCacheSpec(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=dt, max_batch=4, max_seq_len=8192,
                       page_bytes=2 << 20, layout=layout)
    with make_cache(kind, spec, backend="cuda", device="cuda") as cache:
        slots = [cache.alloc_slot() for _ in range(3)]
        lens = [300, 1, 2000]
        cache.step({s: n for s, n in zip(slots, lens)})
        g = torch.Generator(device="cuda").manual_seed(1)
        hist = []
        slot_t = torch.tensor(slots, dtype=torch.int32, device="cuda")
        for s, n in zip(slots, lens):                      # prefill each request
            k = torch.randn(1, n, HKV, D, device="cuda", dtype=dt, generator=g)
            v = torch.randn(1, n, HKV, D, device="cuda", dtype=dt, generator=g)
            q = torch.randn(1, n, HQ, D, device="cuda", dtype=dt, generator=g)
            cache.attention(0, q, k, v, torch.zeros(1, dtype=torch.int32, device="cuda"),
                            torch.tensor([s], dtype=torch.int32, device="cuda"))
            hist.append((k[0], v[0]))
        cache.step({s: n + 1 for s, n in zip(slots, lens)})
        q = torch.randn(3, 1, HQ, D, device="cuda", dtype=dt, generator=g)
        k = torch.randn(3, 1, HKV, D, device="cuda", dtype=dt, generator=g)
        v = torch.randn(3, 1, HKV, D, device="cuda", dtype=dt, generator=g)
        out = cache.attention(0, q, k, v, torch.tensor(lens, dtype=torch.int32, device="cuda"), slot_t)
        torch.cuda.synchronize()
        want = torch.cat([naive_attention(q[b:b + 1].cpu(), torch.cat([hist[b][0], k[b]]).cpu()[None],
                                          torch.cat([hist[b][1], v[b]]).cpu()[None]) for b in range(3)])
        torch.testing.assert_close(out.cpu().float(), want.float(), **TOL[dt])


def test_paged_reference_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(2)
    dt = torch.float16
    k_pool = torch.randn(64, 16, HKV, D, device="cuda", dtype=dt, generator=g)
    v_pool = torch.randn(64, 16, HKV, D, device="cuda", dtype=dt, generator=g)
    table = torch.randperm(64, device="cuda", generator=g)[:32].view(2, 16).to(torch.int32)
    q = torch.randn(2, 1, HQ, D, device="cuda", dtype=dt, generator=g)
    seqlens = [40, 200]
    out = paged_attention_with_kvcache(q, k_pool, v_pool, table,
                                       cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device="cuda"))
    dense_k = k_pool[table.long()].reshape(2, -1, HKV, D)
    dense_v = v_pool[table.long()].reshape(2, -1, HKV, D)
    want = torch.cat([naive_attention(q[b:b + 1].cpu(), dense_k[b:b + 1, :n].cpu(), dense_v[b:b + 1, :n].cpu())
                      for b, n in enumerate(seqlens)])
    torch.testing.assert_close(out.cpu().float(), want.float(), **TOL[dt])
