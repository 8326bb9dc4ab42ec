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
