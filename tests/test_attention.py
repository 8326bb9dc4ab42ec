"""Attention entry points against the float32 oracle: NHD, HND, strided layer-group views and paged,
in-place append, GQA, bottom-right causal alignment, fp32/fp16/bf16, and typed errors for bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmem.attention import flash_attn_with_kvcache, naive_attention, paged_attention_with_kvcache
from vmem.errors import VmemInvalidArgument, VmemUnsupported

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
MAX_BATCH, MAX_SEQ, HKV, D = 6, 64, 2, 16


def close(got, want, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol * 4, rtol=tol * 4)


def make_cache(layout, dtype, gen, group=3, member=1):
    """(k_cache, v_cache, k_nhd, v_nhd): the cache as the kernel sees it, and an NHD view of the same memory."""
    if layout == "NHD":
        k = torch.randn(MAX_BATCH, MAX_SEQ, HKV, D, generator=gen).to(dtype)
        v = torch.randn(MAX_BATCH, MAX_SEQ, HKV, D, generator=gen).to(dtype)
        return k, v, k, v
    if layout == "HND":
        k = torch.randn(MAX_BATCH, HKV, MAX_SEQ, D, generator=gen).to(dtype)
        v = torch.randn(MAX_BATCH, HKV, MAX_SEQ, D, generator=gen).to(dtype)
        return k, v, k.transpose(1, 2), v.transpose(1, 2)
    # GROUPED: several layers in one tensor, this layer a strided view
    kg = torch.randn(MAX_BATCH, MAX_SEQ, group, HKV, D, generator=gen).to(dtype)
    vg = torch.randn(MAX_BATCH, MAX_SEQ, group, HKV, D, generator=gen).to(dtype)
    return kg[:, :, member], vg[:, :, member], kg[:, :, member], vg[:, :, member]


def expected(q, k_nhd, v_nhd, rows, seqlens, k_new, v_new, causal, scale=None):
    """Per request: naive attention over the (old cache + new tokens), and the cache rows after the append."""
    outs = []
    for b, (r, s) in enumerate(zip(rows, seqlens)):
        keys, vals = k_nhd[r, :s].clone(), v_nhd[r, :s].clone()
        if k_new is not None:
            keys, vals = torch.cat([keys, k_new[b]]), torch.cat([vals, v_new[b]])
        outs.append(naive_attention(q[b:b + 1], keys[None], vals[None], causal=causal, softmax_scale=scale))
    return torch.cat(outs)


LAYOUTS = ["NHD", "HND", "GROUPED"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen_new,num_heads", [(1, 4), (5, 4), (7, 2)])
def test_append_and_attend_matches_oracle(layout, dtype, seqlen_new, num_heads):
    gen = torch.Generator().manual_seed(seqlen_new * 10 + num_heads)
    k_cache, v_cache, k_nhd, v_nhd = make_cache(layout, dtype, gen)
    before_k, before_v = k_nhd.clone(), v_nhd.clone()
    rows = [4, 0, 1, 2, 5]                      # a run of consecutive rows (0, 1, 2) and two loners
    seqlens = [9, 20, 20, 3, 0]                 # rows 0 and 1 share a length: one batched call
    batch = len(rows)
    q = torch.randn(batch, seqlen_new, num_heads, D, generator=gen).to(dtype)
    k_new = torch.randn(batch, seqlen_new, HKV, D, generator=gen).to(dtype)
    v_new = torch.randn(batch, seqlen_new, HKV, D, generator=gen).to(dtype)
    want = expected(q, before_k, before_v, rows, seqlens, k_new, v_new, causal=True)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new,
                                  cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
                                  cache_batch_idx=torch.tensor(rows, dtype=torch.int32),
                                  kv_layout="HND" if layout == "HND" else "NHD")
    assert out.shape == q.shape and out.dtype == dtype
    close(out, want, dtype)
    # appended in place, nothing else touched
    after_k = before_k.clone()
    after_v = before_v.clone()
    for b, (r, s) in enumerate(zip(rows, seqlens)):
        after_k[r, s:s + seqlen_new] = k_new[b]
        after_v[r, s:s + seqlen_new] = v_new[b]
    assert torch.equal(k_nhd, after_k) and torch.equal(v_nhd, after_v)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_append_reads_cache_only(layout):
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache, k_nhd, v_nhd = make_cache(layout, torch.float32, gen)
    snapshot = k_nhd.clone()
    q = torch.randn(3, 1, 4, D, generator=gen)
    rows, seqlens = [3, 1, 2], [11, 30, 30]
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
                                  cache_batch_idx=torch.tensor(rows, dtype=torch.int32),
                                  kv_layout="HND" if layout == "HND" else "NHD")
    close(out, expected(q, k_nhd, v_nhd, rows, seqlens, None, None, True), torch.float32)
    assert torch.equal(k_nhd, snapshot)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seqlen_new", [1, 4])
def test_nothing_past_the_length_is_used(layout, seqlen_new):
    """Poison every position at or past cache_seqlens + seqlen_new (and unused rows) with NaN: one NaN read
    into the softmax would spread to the output. On CUDA those pages may be unmapped."""
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, k_nhd, v_nhd = make_cache(layout, torch.float32, gen)
    rows, seqlens = [2, 3, 0], [10, 10, 33]
    for t in (k_nhd, v_nhd):
        keep = torch.zeros(MAX_BATCH, MAX_SEQ, dtype=torch.bool)
        for r, s in zip(rows, seqlens):
            keep[r, :s] = True
        t[~keep] = float("nan")
    q = torch.randn(3, seqlen_new, 4, D, generator=gen)
    k_new = torch.randn(3, seqlen_new, HKV, D, generator=gen)
    v_new = torch.randn(3, seqlen_new, HKV, D, generator=gen)
    want = expected(q, k_nhd.clone(), v_nhd.clone(), rows, seqlens, k_new, v_new, True)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                  cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
                                  cache_batch_idx=torch.tensor(rows, dtype=torch.int32),
                                  kv_layout="HND" if layout == "HND" else "NHD")
    assert not out.isnan().any()
    close(out, want, torch.float32)


def test_int_seqlens_default_rows_and_scale():
    gen = torch.Generator().manual_seed(2)
    k_cache, v_cache, _, _ = make_cache("NHD", torch.float32, gen)
    q = torch.randn(4, 2, 4, D, generator=gen)
    k_new = torch.randn(4, 2, HKV, D, generator=gen)
    v_new = torch.randn(4, 2, HKV, D, generator=gen)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=10, softmax_scale=0.3)
    want = expected(q, ref_k, ref_v, [0, 1, 2, 3], [10] * 4, k_new, v_new, True, scale=0.3)
    close(out, want, torch.float32)


def test_seqlens_none_attends_whole_cache_non_causal():
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache, _, _ = make_cache("HND", torch.float32, gen)
    q = torch.randn(2, 3, 2, D, generator=gen)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, causal=False, kv_layout="HND")
    want = naive_attention(q, k_cache[:2].transpose(1, 2), v_cache[:2].transpose(1, 2), causal=False)
    close(out, want, torch.float32)


def test_causal_is_bottom_right_aligned():
    """A chunk of 3 queries after 5 cached tokens: query i sees keys [0, 5 + i]; checked by hand."""
    k_cache = torch.zeros(1, 16, 1, 1)
    v_cache = torch.zeros(1, 16, 1, 1)
    v_cache[0, :8, 0, 0] = torch.arange(8, dtype=torch.float32)    # value = position
    q = torch.zeros(1, 3, 1, 1)                                      # uniform weights over visible keys
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k=k_cache[:, 5:8].clone(), v=v_cache[:, 5:8].clone(),
                                  cache_seqlens=5)
    # mean of positions 0..5, 0..6, 0..7
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([2.5, 3.0, 3.5]))


def test_rows_with_no_visible_key_are_zero():
    """seqlen_q > cached length without an append: FlashAttention gives zeros for the first rows."""
    k_cache, v_cache = torch.randn(1, 8, 1, 4), torch.randn(1, 8, 1, 4)
    q = torch.randn(1, 4, 1, 4)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=2)
    assert torch.equal(out[0, :2], torch.zeros(2, 1, 4))
    close(out[:, 2:], naive_attention(q[:, 2:], k_cache[:, :2], v_cache[:, :2]), torch.float32)
    assert torch.equal(flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=0), torch.zeros(1, 4, 1, 4))
    assert torch.equal(flash_attn_with_kvcache(q[:, :1], k_cache, v_cache, cache_seqlens=0), torch.zeros(1, 1, 1, 4))
    table = torch.zeros(1, 2, dtype=torch.int32)
    assert torch.equal(paged_attention_with_kvcache(q[:, :1], k_cache, v_cache, table, cache_seqlens=0),
                       torch.zeros(1, 1, 1, 4))


def test_gqa_head_mapping():
    """Query head h must read KV head h // group: give each KV head a distinct constant value."""
    k_cache = torch.zeros(1, 4, 2, 2)
    v_cache = torch.zeros(1, 4, 2, 2)
    v_cache[0, :, 1] = 1.0
    q = torch.randn(1, 1, 6, 2)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=4)
    assert torch.equal(out[0, 0, :, 0], torch.tensor([0.0, 0, 0, 1, 1, 1]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen_new", [1, 6])
def test_paged_matches_oracle(dtype, seqlen_new):
    gen = torch.Generator().manual_seed(seqlen_new)
    num_blocks, block_size, batch, max_blocks = 40, 4, 4, 8
    k_pool = torch.randn(num_blocks, block_size, HKV, D, generator=gen).to(dtype)
    v_pool = torch.randn(num_blocks, block_size, HKV, D, generator=gen).to(dtype)
    table = torch.randperm(num_blocks, generator=gen)[:batch * max_blocks].view(batch, max_blocks).to(torch.int32)
    seqlens = [7, 13, 13, 0]
    dense_k = k_pool[table.long()].reshape(batch, -1, HKV, D)        # logical view of each request
    dense_v = v_pool[table.long()].reshape(batch, -1, HKV, D)
    q = torch.randn(batch, seqlen_new, 4, D, generator=gen).to(dtype)
    k_new = torch.randn(batch, seqlen_new, HKV, D, generator=gen).to(dtype)
    v_new = torch.randn(batch, seqlen_new, HKV, D, generator=gen).to(dtype)
    want = expected(q, dense_k, dense_v, range(batch), seqlens, k_new, v_new, True)
    out = paged_attention_with_kvcache(q, k_pool, v_pool, table, k_new, v_new,
                                       cache_seqlens=torch.tensor(seqlens, dtype=torch.int32))
    close(out, want, dtype)
    for b, s in enumerate(seqlens):                                     # appended into the right blocks
        for i in range(seqlen_new):
            p = s + i
            blk = int(table[b, p // block_size])
            assert torch.equal(k_pool[blk, p % block_size], k_new[b, i])
            assert torch.equal(v_pool[blk, p % block_size], v_new[b, i])


def test_paged_uses_nothing_past_the_length():
    gen = torch.Generator().manual_seed(6)
    k_pool = torch.full((12, 4, HKV, D), float("nan"))
    v_pool = torch.full((12, 4, HKV, D), float("nan"))
    table = torch.tensor([[5, 2, 9], [0, 7, 1]], dtype=torch.int32)
    seqlens = [6, 1]                                   # + 1 new token: blocks [5, 2] and [0] are in use
    for b, s in enumerate(seqlens):
        for p in range(s):
            k_pool[table[b, p // 4], p % 4] = torch.randn(HKV, D, generator=gen)
            v_pool[table[b, p // 4], p % 4] = torch.randn(HKV, D, generator=gen)
    q = torch.randn(2, 1, 4, D, generator=gen)
    k_new, v_new = torch.randn(2, 1, HKV, D, generator=gen), torch.randn(2, 1, HKV, D, generator=gen)
    dense_k = k_pool[table.long()].reshape(2, -1, HKV, D)
    dense_v = v_pool[table.long()].reshape(2, -1, HKV, D)
    want = expected(q, dense_k, dense_v, range(2), seqlens, k_new, v_new, True)
    out = paged_attention_with_kvcache(q, k_pool, v_pool, table, k_new, v_new,
                                       cache_seqlens=torch.tensor(seqlens, dtype=torch.int32))
    assert not out.isnan().any()
    close(out, want, torch.float32)


def test_vmem_and_paged_agree_on_the_same_data():
    gen = torch.Generator().manual_seed(9)
    batch, block_size, seq = 3, 8, 32
    k_dense = torch.randn(batch, seq, HKV, D, generator=gen)
    v_dense = torch.randn(batch, seq, HKV, D, generator=gen)
    table = torch.arange(batch * seq // block_size, dtype=torch.int32).view(batch, -1).flip(1).contiguous()
    k_pool = torch.empty(batch * seq // block_size, block_size, HKV, D)
    v_pool = torch.empty_like(k_pool)
    k_pool[table.long()] = k_dense.view(batch, -1, block_size, HKV, D)
    v_pool[table.long()] = v_dense.view(batch, -1, block_size, HKV, D)
    q = torch.randn(batch, 1, 4, D, generator=gen)
    lens = torch.tensor([5, 31, 17], dtype=torch.int32)
    a = flash_attn_with_kvcache(q, k_dense, v_dense, cache_seqlens=lens)
    b = paged_attention_with_kvcache(q, k_pool, v_pool, table, cache_seqlens=lens)
    close(a, b, torch.float32)


# ---- bad input: typed errors, nothing written -------------------------------------------------------

def _args():
    k_cache, v_cache = torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8)
    q = torch.randn(2, 1, 4, 8)
    k, v = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    return q, k_cache, v_cache, k, v


@pytest.mark.parametrize("change,message", [
    (dict(q=torch.randn(2, 4, 8)), "q must be a 4-D"),
    (dict(q=torch.randn(2, 1, 3, 8)), "multiple of"),
    (dict(q=torch.randn(2, 1, 4, 4)), "head_dim"),
    (dict(q=torch.randn(2, 1, 4, 8, dtype=torch.float64)), "dtype"),
    (dict(k_cache=torch.zeros(4, 16, 2, 8, dtype=torch.float16)), "dtype"),
    (dict(v_cache=torch.zeros(4, 15, 2, 8)), "shapes differ"),
    (dict(k_cache=torch.zeros(4, 16, 8, 2).transpose(-1, -2)), "contiguous last dimension"),
    (dict(k=None), "together"),
    (dict(k=torch.randn(2, 1, 1, 8), v=torch.randn(2, 1, 1, 8)), "num_kv_heads"),
    (dict(cache_seqlens=None), "cache_seqlens is required"),
    (dict(cache_seqlens=torch.tensor([1, -1], dtype=torch.int32)), ">= 0"),
    (dict(cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32)), "entries"),
    (dict(cache_seqlens=torch.tensor([1.0, 2.0])), "integer"),
    (dict(cache_seqlens=torch.tensor([3, 16], dtype=torch.int32)), "seqlen_cache is 16"),
    (dict(cache_batch_idx=torch.tensor([0, 4], dtype=torch.int32)), "outside the cache's rows"),
    (dict(cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32)), "duplicate"),
    (dict(cache_batch_idx=torch.tensor([1], dtype=torch.int32)), "cache_batch_idx must be"),
    (dict(kv_layout="NDH"), "kv_layout"),
    (dict(softmax_scale="x"), "softmax_scale"),
])
def test_bad_arguments_raise_typed_errors_and_write_nothing(change, message):
    q, k_cache, v_cache, k, v = _args()
    kw = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v,
              cache_seqlens=torch.tensor([1, 2], dtype=torch.int32), cache_batch_idx=None)
    kw.update(change)
    snapshot = kw["k_cache"].clone()
    with pytest.raises(VmemInvalidArgument, match=message):
        flash_attn_with_kvcache(**kw)
    assert torch.equal(kw["k_cache"], snapshot)


def test_more_requests_than_rows_needs_batch_idx():
    with pytest.raises(VmemInvalidArgument, match="only 2 rows"):
        flash_attn_with_kvcache(torch.randn(3, 1, 2, 8), torch.zeros(2, 8, 2, 8), torch.zeros(2, 8, 2, 8))


def test_reference_rejects_flash_only_options():
    q, k_cache, v_cache, _, _ = _args()
    with pytest.raises(VmemUnsupported, match="window_size"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=1, window_size=(8, 0))


@pytest.mark.parametrize("change,message", [
    (dict(block_table=torch.zeros(2, 4)), "block_table must be"),
    (dict(block_table=torch.zeros(3, 4, dtype=torch.int32)), "block_table must be"),
    (dict(block_table=torch.tensor([[0, 99, 0, 0], [1, 2, 3, 4]], dtype=torch.int32),
          cache_seqlens=torch.tensor([5, 1], dtype=torch.int32)), "block ids outside"),
    (dict(cache_seqlens=torch.tensor([16, 0], dtype=torch.int32)), "covers 16"),
    (dict(block_table=torch.tensor([[3, 0, 0, 0], [3, 0, 0, 0]], dtype=torch.int32),
          cache_seqlens=torch.tensor([2, 2], dtype=torch.int32)), "same \\(block, offset\\)"),
    (dict(k_pool=torch.zeros(10, 4, 2, 8, dtype=torch.bfloat16)), "dtype"),
])
def test_paged_bad_arguments(change, message):
    k_pool, v_pool = torch.zeros(10, 4, 2, 8), torch.zeros(10, 4, 2, 8)
    kw = dict(q=torch.randn(2, 1, 4, 8), k_pool=k_pool, v_pool=v_pool,
              block_table=torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32),
              k=torch.randn(2, 1, 2, 8), v=torch.randn(2, 1, 2, 8),
              cache_seqlens=torch.tensor([1, 2], dtype=torch.int32))
    kw.update(change)
    snapshot = kw["k_pool"].clone()
    with pytest.raises(VmemInvalidArgument, match=message):
        paged_attention_with_kvcache(**kw)
    assert torch.equal(kw["k_pool"], snapshot)


def test_naive_attention_checks_shapes():
    with pytest.raises(VmemInvalidArgument):
        naive_attention(torch.randn(1, 2, 4, 8), torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8))
    with pytest.raises(VmemInvalidArgument):
        naive_attention(torch.randn(1, 2, 4, 8), torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8))


# ---- random shapes --------------------------------------------------------------------------------

@settings(max_examples=40)
@given(data=st.data(), layout=st.sampled_from(LAYOUTS), group=st.sampled_from([1, 2, 3]),
       seqlen_new=st.integers(0, 6), causal=st.booleans())
def test_random_batches_match_oracle(data, layout, group, seqlen_new, causal):
    batch = data.draw(st.integers(1, MAX_BATCH))
    rows = data.draw(st.permutations(range(MAX_BATCH)))[:batch]
    seqlens = [data.draw(st.integers(0 if seqlen_new else 1, MAX_SEQ - max(seqlen_new, 1))) for _ in rows]
    if data.draw(st.booleans()):                      # equal lengths make batched runs
        seqlens = [seqlens[0]] * batch
    seqlen_q = seqlen_new or data.draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    k_cache, v_cache, k_nhd, v_nhd = make_cache(layout, torch.float32, gen)
    before_k, before_v = k_nhd.clone(), v_nhd.clone()
    q = torch.randn(batch, seqlen_q, HKV * group, D, generator=gen)
    k_new = torch.randn(batch, seqlen_new, HKV, D, generator=gen) if seqlen_new else None
    v_new = torch.randn(batch, seqlen_new, HKV, D, generator=gen) if seqlen_new else None
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, causal=causal,
                                  cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
                                  cache_batch_idx=torch.tensor(rows, dtype=torch.int32),
                                  kv_layout="HND" if layout == "HND" else "NHD")
    close(out, expected(q, before_k, before_v, rows, seqlens, k_new, v_new, causal), torch.float32)
