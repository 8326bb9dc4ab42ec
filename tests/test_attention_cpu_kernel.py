"""The fused CPU decode kernel (Note [CPU decode attention]) against naive float32 attention.

Every cache is filled with NaN past each request's length: a kernel that read one element there would
return NaN. Both the AVX-512 path (where the CPU has it) and the forced portable path run every case.
"""
import importlib.util
import pathlib
import re

import pytest
import torch

from vmem.attention import cpu_decode, flash_attn_with_kvcache, naive_attention
from vmem._native import ffi, lib
from vmem.errors import VmemInvalidArgument

D = 64
HKV = 2
LENGTHS = [1, 63, 64, 65, 130, 0, 7]          # 64 = the kernel's key block; 0 gives zeros
ROWS = [3, 0, 6, 1, 5, 2, 4]                  # cache rows, not in order
PATHS = cpu_decode.PATHS                      # "auto", "avx512" (no bf16 dot products), "portable"


def tol(dtype):
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-5)
    return dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)


def poisoned_cache(layout: str, dtype, max_seq: int, head_dim: int = D, num_kv_heads: int = HKV, seed=0):
    """(k_nhd, v_nhd, keys, values): NHD views of caches holding random rows [0, L) and NaN past them.

    layout NHD [B, S, Hkv, D]; HND [B, Hkv, S, D]; GROUP: layer 1 of a layer-group tensor
    [B, S, 3, Hkv, D]; GROUP_HND: head-major rows with 3 layers interleaved per token [B, Hkv, S, 3, D].
    keys/values[b] are [1, L, Hkv, D] copies of what request b holds (for the oracle).
    """
    g = torch.Generator().manual_seed(seed)
    nb = len(ROWS)
    if layout == "NHD":
        k, v = (torch.full((nb, max_seq, num_kv_heads, head_dim), float("nan")).to(dtype) for _ in range(2))
        k_nhd, v_nhd = k, v
    elif layout == "HND":
        k, v = (torch.full((nb, num_kv_heads, max_seq, head_dim), float("nan")).to(dtype) for _ in range(2))
        k_nhd, v_nhd = k.transpose(1, 2), v.transpose(1, 2)
    elif layout == "GROUP":
        k, v = (torch.full((nb, max_seq, 3, num_kv_heads, head_dim), float("nan")).to(dtype) for _ in range(2))
        k_nhd, v_nhd = k[:, :, 1], v[:, :, 1]
    else:
        k, v = (torch.full((nb, num_kv_heads, max_seq, 3, head_dim), float("nan")).to(dtype) for _ in range(2))
        k_nhd, v_nhd = k[:, :, :, 1].transpose(1, 2), v[:, :, :, 1].transpose(1, 2)
    keys, values = [], []
    for row, n in zip(ROWS, LENGTHS):
        kb, vb = (torch.randn(1, n, num_kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
        k_nhd[row, :n], v_nhd[row, :n] = kb[0], vb[0]
        keys.append(kb), values.append(vb)
    return k_nhd, v_nhd, keys, values


def expected(q, keys, values, scale):
    outs = []
    for b in range(q.shape[0]):
        if keys[b].shape[1] == 0:
            outs.append(torch.zeros_like(q[b:b + 1]))
        else:
            outs.append(naive_attention(q[b:b + 1], keys[b], values[b], causal=False, softmax_scale=scale))
    return torch.cat(outs)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("layout", ["NHD", "HND", "GROUP", "GROUP_HND"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_naive(dtype, layout, group, path):
    k_nhd, v_nhd, keys, values = poisoned_cache(layout, dtype, max_seq=160)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(ROWS), 1, HKV * group, D, generator=g).to(dtype)
    out = torch.empty_like(q)
    scale = 0.3
    assert cpu_decode.decode_attention(q, k_nhd, v_nhd, LENGTHS, ROWS, scale, out, path=path)
    torch.testing.assert_close(out.float(), expected(q, keys, values, scale).float(), **tol(dtype))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("head_dim", [40, 48, 256])           # 40: no 16-wide vectors (portable anyway)
def test_head_dims(head_dim, path):
    k_nhd, v_nhd, keys, values = poisoned_cache("HND", torch.bfloat16, max_seq=140, head_dim=head_dim)
    q = torch.randn(len(ROWS), 1, HKV * 4, head_dim).to(torch.bfloat16)
    out = torch.empty_like(q)
    assert cpu_decode.decode_attention(q, k_nhd, v_nhd, LENGTHS, ROWS, head_dim ** -0.5, out, path=path)
    torch.testing.assert_close(out.float(), expected(q, keys, values, head_dim ** -0.5).float(),
                               **tol(torch.bfloat16))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("num_kv_heads,group", [(8, 2), (8, 3), (8, 5), (8, 6), (8, 16), (1, 68)])
def test_work_items_and_register_blocks(num_kv_heads, group, path):
    """Query rows per KV head not a multiple of the 4-row register block (3, 5, 6), several KV heads per
    work item or only some of them (8 x 16 rows > the 64 rows of one item), and a group split over two
    items (68 rows)."""
    k_nhd, v_nhd, keys, values = poisoned_cache("NHD", torch.bfloat16, max_seq=140, num_kv_heads=num_kv_heads)
    q = torch.randn(len(ROWS), 1, num_kv_heads * group, D).to(torch.bfloat16)
    out = torch.empty_like(q)
    assert cpu_decode.decode_attention(q, k_nhd, v_nhd, LENGTHS, ROWS, 0.125, out, path=path)
    torch.testing.assert_close(out.float(), expected(q, keys, values, 0.125).float(), **tol(torch.bfloat16))


@pytest.mark.parametrize("path", PATHS)
def test_threads(path):
    """2 worker threads (enough keys to start them), lengths far apart."""
    g = torch.Generator().manual_seed(2)
    lengths, rows = [9000, 8191, 1, 0], [0, 1, 2, 3]
    k, v = (torch.randn(4, 9000, 2, 32, generator=g) for _ in range(2))
    q = torch.randn(4, 1, 8, 32, generator=g)
    out = torch.empty_like(q)
    assert cpu_decode.decode_attention(q, k, v, lengths, rows, 0.2, out, num_threads=2, path=path)
    want = expected(q, [k[b:b + 1, :n] for b, n in enumerate(lengths)], [v[b:b + 1, :n] for b, n in enumerate(lengths)],
                    0.2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["auto", "portable"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_context_equals_unsplit(dtype, layout, path):
    """Keys cut into chunks (partials merged) give the unsplit result, on 1, 2 and 3 threads: chunk lengths
    off the 64-key block (100), on it (64), a chunk longer than some requests (256); NaN past each length
    catches a chunk reading beyond its end."""
    k_nhd, v_nhd, keys, values = poisoned_cache(layout, dtype, max_seq=160, num_kv_heads=2)
    q = torch.randn(len(ROWS), 1, 8, D, generator=torch.Generator().manual_seed(4)).to(dtype)
    whole = torch.empty_like(q)
    assert cpu_decode.decode_attention(q, k_nhd, v_nhd, LENGTHS, ROWS, 0.3, whole, num_threads=1, path=path)
    torch.testing.assert_close(whole.float(), expected(q, keys, values, 0.3).float(), **tol(dtype))
    for split in (64, 100, 256):
        for threads in (1, 2, 3):
            out = torch.empty_like(q)
            assert cpu_decode.decode_attention(q, k_nhd, v_nhd, LENGTHS, ROWS, 0.3, out, num_threads=threads,
                                               path=path, split_keys=split)
            atol = 1e-6 if dtype == torch.float32 else 8e-3       # bf16: rounding of the output once more
            torch.testing.assert_close(out.float(), whole.float(), atol=atol, rtol=atol)


@pytest.mark.parametrize("layout,heads_per_item", [("NHD", 2), ("HND", 1)])
@pytest.mark.parametrize("batch", [1, 2, 32])
def test_work_split_gives_threads_equal_work_at_few_heads(layout, heads_per_item, batch):
    """8/2/64 heads at 4K context: 1 thread takes the whole call; 2 and 3 threads get work items of about
    equal size (context chunks where batch x KV heads is too few), at least 3 per thread, so the busiest
    thread has at most a quarter more than its share. NHD items take both KV heads (whole
    token rows), HND one (one sequential stream each)."""
    shape = (batch, 4096, 2, 64) if layout == "NHD" else (batch, 2, 4096, 64)
    k = torch.zeros(shape, dtype=torch.bfloat16)
    k_nhd = k if layout == "NHD" else k.transpose(1, 2)
    q = torch.zeros(batch, 1, 8, 64, dtype=torch.bfloat16)
    ends, rows = [4096] * batch, list(range(batch))
    one = cpu_decode.decode_plan(q, k_nhd, k_nhd, ends, rows, num_threads=1)
    assert one["num_threads"] == 1 and one["chunk_keys"] == 0 and one["heads_per_item"] == heads_per_item
    for threads in (2, 3):
        plan = cpu_decode.decode_plan(q, k_nhd, k_nhd, ends, rows, num_threads=threads)
        assert plan["num_threads"] == threads and plan["heads_per_item"] == heads_per_item
        assert plan["total_work"] == batch * 2 * 4096
        busiest = -(-plan["num_items"] // threads) * plan["max_item_work"]     # items taken in turn
        assert plan["num_items"] >= 3 * threads and busiest <= 1.25 * plan["total_work"] / threads
        assert (plan["chunk_keys"] > 0) == (batch * 2 // heads_per_item < 4 * threads)
    with pytest.raises(VmemInvalidArgument):
        cpu_decode.decode_plan(q, k_nhd, k_nhd, ends, rows, num_threads=2, split_keys=-1)


def test_split_work_on_threads_equals_one_thread():
    """A real 2- and 3-thread call that the kernel cuts by context (1 request, 2 KV heads, 6000 keys)."""
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(1, 2, 6000, 64, generator=g).transpose(1, 2) for _ in range(2))
    q = torch.randn(1, 1, 8, 64, generator=g)
    one = torch.empty_like(q)
    assert cpu_decode.decode_attention(q, k, v, [6000], [0], 0.125, one, num_threads=1)
    torch.testing.assert_close(one, naive_attention(q, k, v, causal=False, softmax_scale=0.125), atol=1e-5, rtol=1e-5)
    for threads in (2, 3):
        assert cpu_decode.decode_plan(q, k, v, [6000], [0], num_threads=threads)["chunk_keys"] > 0
        out = torch.empty_like(q)
        assert cpu_decode.decode_attention(q, k, v, [6000], [0], 0.125, out, num_threads=threads)
        torch.testing.assert_close(out, one, atol=1e-6, rtol=1e-6)


def test_large_scores_stay_finite():
    """Scores in the thousands: the online softmax rescales instead of overflowing."""
    g = torch.Generator().manual_seed(11)     # was the global RNG: the draw depended on the tests before
    k = torch.randn(1, 300, 1, 32, generator=g) * 30
    v = torch.randn(1, 300, 1, 32, generator=g)
    q = torch.randn(1, 1, 4, 32, generator=g) * 30
    out = torch.empty_like(q)
    for path in PATHS:
        assert cpu_decode.decode_attention(q, k, v, [300], [0], 1.0, out, path=path)
        assert torch.isfinite(out).all()
        # fp32 scores near |q||k| ~ 5e3 carry ~3e-4 of rounding into the exponent, whatever the order of
        # summation, so the weights (and outputs) agree with the naive oracle to ~1e-3, not 1e-4.
        torch.testing.assert_close(out, naive_attention(q, k, v, causal=False, softmax_scale=1.0),
                                   atol=2e-3, rtol=2e-3)


def test_only_vector_paths_are_wired_into_the_reference():
    assert cpu_decode.fast(40) is False and cpu_decode.fast(512) is False
    assert cpu_decode.fast(128) == (cpu_decode.kernel_path(128) != "portable")


def test_the_best_path_the_cpu_has_is_selected():
    with open("/proc/cpuinfo") as f:
        flags = f.read().split()
    has_avx512, has_bf16 = "avx512f" in flags, "avx512f" in flags and "avx512_bf16" in flags
    best = "avx512_bf16" if has_bf16 else "avx512" if has_avx512 else "portable"
    assert cpu_decode.kernel_path(128) == best
    assert cpu_decode.kernel_path(48) == ("avx512" if has_avx512 else "portable")     # bf16 dot needs 32 | D
    assert cpu_decode.kernel_path(128, "avx512") == ("avx512" if has_avx512 else "portable")
    assert cpu_decode.kernel_path(128, "portable") == "portable"
    assert cpu_decode.kernel_path(40) == "portable"


def test_invalid_arguments_are_refused_before_writing():
    q = torch.randn(2, 1, 6, 16)
    k = torch.randn(2, 8, 4, 16)
    out = torch.full_like(q, 7.0)
    assert not cpu_decode.decode_attention(q, k, k, [8, 8], [0, 1], 1.0, out)     # 6 heads over 4 KV heads
    assert not cpu_decode.decode_attention(q[:, :, :4], k, k, [8, -1], [0, 1], 1.0, out[:, :, :4].contiguous())
    assert torch.all(out == 7.0)
    assert lib.vmem_attn_decode(ffi.NULL) == lib.VMEM_ERR_INVALID


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attn_with_kvcache_decode_uses_the_kernel(layout, dtype, monkeypatch):
    """The reference appends k/v, then the kernel attends over [0, seqlen + 1); SDPA gives the same."""
    batch, hq, seqlen_cache = 3, 8, 96
    g = torch.Generator().manual_seed(3)
    shape = (4, seqlen_cache, HKV, D) if layout == "NHD" else (4, HKV, seqlen_cache, D)
    k_cache, v_cache = (torch.randn(*shape, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(batch, 1, hq, D, generator=g).to(dtype)
    k, v = (torch.randn(batch, 1, HKV, D, generator=g).to(dtype) for _ in range(2))
    seqlens = torch.tensor([5, 0, 90], dtype=torch.int32)
    idx = torch.tensor([2, 0, 3], dtype=torch.int32)
    calls = []
    real = cpu_decode.decode_attention
    monkeypatch.setattr(cpu_decode, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kc, vc = k_cache.clone(), v_cache.clone()
    out = flash_attn_with_kvcache(q, kc, vc, k=k, v=v, cache_seqlens=seqlens, cache_batch_idx=idx,
                                  kv_layout=layout)
    want_calls = [1] if cpu_decode.fast(D) else []          # the portable path is left to SDPA
    assert calls == want_calls
    monkeypatch.setattr(cpu_decode, "ENABLED", False)
    kc2, vc2 = k_cache.clone(), v_cache.clone()
    sdpa = flash_attn_with_kvcache(q, kc2, vc2, k=k, v=v, cache_seqlens=seqlens, cache_batch_idx=idx,
                                   kv_layout=layout)
    assert calls == want_calls
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    torch.testing.assert_close(out.float(), sdpa.float(), **tol(dtype))


def test_build_py_feeds_vmem_attn_h_to_cffi():
    """vmem_attn.h is the kernel's only declaration: build.py's cdef must carry all of it."""
    native = pathlib.Path(__file__).resolve().parent.parent / "vmem" / "_native"
    spec = importlib.util.spec_from_file_location("_vmem_build_check", native / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    header = (native / "vmem_attn.h").read_text()
    cdef = build._cdef(header)
    funcs = re.findall(r"^int (vmem_attn_\w+)\(", header, re.M)
    consts = dict(re.findall(r"^#define (VMEM_ATTN_\w+) (\d+)$", header, re.M))
    assert "vmem_attn.h" in build.HEADERS and "attn_cpu_x86.c" in build.SOURCES
    assert set(funcs) == {"vmem_attn_decode", "vmem_attn_decode_plan", "vmem_attn_decode_path"} and len(consts) == 8
    for name in funcs:
        assert name + "(" in cdef and callable(getattr(lib, name))
    for name, value in consts.items():
        assert "#define %s ..." % name in cdef and getattr(lib, name) == int(value)
    assert "} vmem_attn_decode_t;" in cdef and ffi.sizeof("vmem_attn_decode_t") > 0
    assert "} vmem_attn_plan_t;" in cdef and ffi.sizeof("vmem_attn_plan_t") > 0
