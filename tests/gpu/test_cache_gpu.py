"""VirtualKVCache on the cuda backend (skipped without a CUDA driver and device)."""

import pytest
import torch

from vmem.allocator import KVCacheSpec, VirtualKVCache, make_cache
from vmem.attention import naive_attention
from vmem.errors import VmemOutOfMemory

pytestmark = pytest.mark.gpu

PAGE = 2 << 20


def gpu_spec(layout="NHD", group=1):
    return KVCacheSpec(num_layers=2, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, max_batch=4,
                       max_seq_len=4096, page_bytes=PAGE, layout=layout, layer_group_size=group)


@pytest.mark.parametrize("layout,group", [("NHD", 1), ("HND", 1), ("GROUPED", 2)])
def test_data_survives_reclamation_on_the_gpu(layout, group):
    spec = gpu_spec(layout, group)
    memory = (spec.pages_for_tokens(1024) + spec.pages_for_tokens(2048)) * PAGE
    with VirtualKVCache(spec, memory_bytes=memory, backend="cuda") as c:
        assert c.device.type == "cuda"
        a, b = c.alloc_slot(), c.alloc_slot()
        c.step({a: 1024, b: 2048})
        k, _ = c.kv(0)
        rows = k[a, :, :1024] if layout == "HND" else k[a, :1024]
        rows.copy_(torch.randn(rows.shape, device="cuda", dtype=torch.bfloat16))
        want = rows.float().sum().item()
        c.free_slot(b)
        d = c.alloc_slot(num_tokens=0)
        if spec.pages_for_tokens(4096) > spec.pages_for_tokens(2048):
            with pytest.raises(VmemOutOfMemory):
                c.step({d: 4096})
        c.step({d: 2048})                               # takes b's pages back (deferred reclamation)
        torch.cuda.synchronize()
        assert c.stats().reclaimed_pages + c.stats().reused_pages > 0
        assert rows.float().sum().item() == want
        c.check_integrity()                             # compares with the driver-side table and runs


def test_attention_on_the_gpu_matches_naive():
    spec = gpu_spec()
    with make_cache("vmem", spec, backend="cuda", async_map=True) as c:
        slots = [c.alloc_slot() for _ in range(3)]
        lengths = [300, 1000, 77]
        c.step(dict(zip(slots, lengths)))
        g = torch.Generator(device="cuda").manual_seed(0)
        hist = []
        for s, n in zip(slots, lengths):
            q, k, v = (torch.randn(1, n, h, 128, device="cuda", generator=g, dtype=torch.bfloat16)
                       for h in (32, 8, 8))
            c.attention(0, q, k, v, torch.zeros(1, dtype=torch.int32, device="cuda"),
                        torch.tensor([s], dtype=torch.int32, device="cuda"))
            hist.append((k, v))
        c.prefetch({s: n + 1 for s, n in zip(slots, lengths)})
        c.step({s: n + 1 for s, n in zip(slots, lengths)})
        q, k, v = (torch.randn(3, 1, h, 128, device="cuda", generator=g, dtype=torch.bfloat16) for h in (32, 8, 8))
        out = c.attention(0, q, k, v, torch.tensor(lengths, dtype=torch.int32, device="cuda"),
                          torch.tensor(slots, dtype=torch.int32, device="cuda"))
        for i, (hk, hv) in enumerate(hist):
            want = naive_attention(q[i:i + 1], torch.cat([hk, k[i:i + 1]], 1), torch.cat([hv, v[i:i + 1]], 1))
            torch.testing.assert_close(out[i:i + 1].float(), want.float(), atol=3e-2, rtol=3e-2)
        c.check_integrity()


def test_eager_reclamation_on_the_gpu():
    spec = gpu_spec()
    with VirtualKVCache(spec, backend="cuda", reclaim="eager") as c:
        s = c.alloc_slot()
        c.step({s: 3000})
        assert c.reservation.mapped_pages == spec.pages_for_tokens(3000)
        c.free_slot(s)
        assert c.reservation.mapped_pages == 0
        c.check_integrity()


def test_cached_prefix_is_mapped_into_another_slot_on_the_gpu():
    """Prefix caching on CUDA: a handle unmapped from its slot keeps its data and is mapped into the next
    request that matches; the aliases read the same bytes."""
    spec = gpu_spec()
    tpp = int(spec.tokens_per_page)
    with VirtualKVCache(spec, memory_bytes=spec.pages_for_tokens(4 * tpp) * PAGE, backend="cuda",
                        prefix_caching=True) as c:
        prompt = list(range(256)) * (3 * tpp // 256 + 1)
        a = c.alloc_slot(token_ids=prompt[:2 * tpp + 5])
        c.step({a: 2 * tpp + 5})
        k, _ = c.kv(0)
        k[a, :2 * tpp].copy_(torch.randn(k[a, :2 * tpp].shape, device="cuda", dtype=torch.bfloat16))
        want = k[a, :2 * tpp].float().sum().item()
        assert c.cache_prefix(a, prompt[:2 * tpp + 5]) == 2 * tpp
        b = c.alloc_slot(token_ids=prompt[:2 * tpp + 9])       # a is live: another slot, mapped by step
        assert b != a and c.num_cached_tokens(b) == 2 * tpp
        c.step({b: 2 * tpp + 9})
        torch.cuda.synchronize()
        assert k[b, :2 * tpp].float().sum().item() == want
        c.free_slot(a)
        c.free_slot(b)
        c.check_integrity()
