"""cache.attention on all three caches equals naive attention over the same history (prefill + decode)."""

import pytest
import torch

from vmem.allocator import KVCacheSpec, make_cache
from vmem.attention import naive_attention
from vmem.errors import VmemInvalidArgument

HQ, HKV, D = 4, 2, 32
CASES = [("vmem", "NHD", 1), ("vmem", "HND", 1), ("vmem", "GROUPED", 2), ("paged", "NHD", 1),
         ("static", "NHD", 1), ("static", "HND", 1)]


def tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,layout,group", CASES)
def test_prefill_then_decode_matches_naive(kind, layout, group, dtype):
    spec = KVCacheSpec(num_layers=2, num_kv_heads=HKV, head_dim=D, dtype=dtype, max_batch=4, max_seq_len=160,
                       page_bytes=4096, layout=layout, layer_group_size=group)
    g = torch.Generator().manual_seed(0)
    prompts = [37, 5, 90]
    with make_cache(kind, spec, backend="host") as cache:
        cache.alloc_slot()                            # slot 0 stays empty: slots need not be 0..B-1
        slots = [cache.alloc_slot() for _ in prompts]
        history = {s: ([], []) for s in slots}
        layer = 1
        # prefill, one request at a time (different lengths)
        for s, n in zip(slots, prompts):
            cache.step({s: n})
            q, k, v = (torch.randn(1, n, h, D, generator=g).to(dtype) for h in (HQ, HKV, HKV))
            out = cache.attention(layer, q, k, v, torch.zeros(1, dtype=torch.int32),
                                  torch.tensor([s], dtype=torch.int32))
            torch.testing.assert_close(out.float(), naive_attention(q, k, v).float(), **tol(dtype))
            history[s][0].append(k), history[s][1].append(v)
        # batched decode steps
        lengths = dict(zip(slots, prompts))
        for _ in range(3):
            cache.step({s: lengths[s] + 1 for s in slots})
            q, k, v = (torch.randn(len(slots), 1, h, D, generator=g).to(dtype) for h in (HQ, HKV, HKV))
            seqlens = torch.tensor([lengths[s] for s in slots], dtype=torch.int32)
            out = cache.attention(layer, q, k, v, seqlens, torch.tensor(slots, dtype=torch.int32))
            for i, s in enumerate(slots):
                history[s][0].append(k[i:i + 1]), history[s][1].append(v[i:i + 1])
                ks, vs = torch.cat(history[s][0], 1), torch.cat(history[s][1], 1)
                want = naive_attention(q[i:i + 1], ks, vs)
                torch.testing.assert_close(out[i:i + 1].float(), want.float(), **tol(dtype))
                lengths[s] += 1
        cache.check_integrity()


@pytest.mark.parametrize("kind", ["vmem", "paged", "static"])
def test_attention_past_what_step_mapped_is_refused(kind):
    spec = KVCacheSpec(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=torch.float32, max_batch=2,
                       max_seq_len=128, page_bytes=4096)
    with make_cache(kind, spec, backend="host") as cache:
        s = cache.alloc_slot()
        cache.step({s: 10})
        q, k, v = torch.randn(1, 4, HQ, D), torch.randn(1, 4, HKV, D), torch.randn(1, 4, HKV, D)
        with pytest.raises(VmemInvalidArgument, match="step"):
            cache.attention(0, q, k, v, torch.tensor([8], dtype=torch.int32), torch.tensor([s], dtype=torch.int32))
        with pytest.raises(VmemInvalidArgument):
            cache.attention(0, q[0], k, v, torch.tensor([0], dtype=torch.int32), torch.tensor([s], dtype=torch.int32))
