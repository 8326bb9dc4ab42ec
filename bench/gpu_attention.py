"""Attention on vmem's virtual KV tensors vs a paged layout, with unmodified GPU kernels.

For decode (one new query per request over a context of C tokens) and prefill (a C-token prompt over
itself, causal), the same K/V contents are put (a) in vmem's contiguous virtual tensors
``[max_batch, max_seq, Hkv, D]`` backed by CUDA VMM pages (VirtualKVCache, backend "cuda") and (b) in a
paged pool ``[num_blocks, block, Hkv, D]`` whose blocks are shuffled, as a paged allocator leaves them.
Each kernel that is importable runs unchanged on both:

  flash_attn   flash_attn_with_kvcache: vmem with cache_batch_idx (the vAttention call), paged with
               block_table (FlashAttention-2 needs blocks of 256 tokens)
  flashinfer   BatchDecode / BatchPrefill WithPagedKVCacheWrapper: vmem as pages of 16 tokens with the
               identity page table of each slot's row, paged with a shuffled table of 16-token pages
  sdpa_flash   torch SDPA restricted to the flash backend: vmem rows are strided views (no copy); the
               paged layout must gather its blocks first (included in its time: SDPA has no block table)

Reported per case: median milliseconds of each (CUDA events, warm-up, repeats of several calls), the
ratio paged / vmem (> 1: vmem faster), and the largest difference between the two outputs. JSON out
(and a PNG if matplotlib is there). Without CUDA the script writes ``{"skipped": ...}`` and exits 0;
``--cpu-smoke`` instead runs the SDPA part on the host backend at toy sizes (checks the script itself).

    python bench/gpu_attention.py                            # quick grid, well under a minute + JIT
    python bench/gpu_attention.py --full                     # batch 1-64 x context 1K-16K
    python bench/gpu_attention.py --kernels sdpa_flash,flash_attn --json out.json --png out.png
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from vmem.allocator import KVCacheSpec, make_cache

KERNELS = ("flash_attn", "flashinfer", "sdpa_flash")
FLASHINFER_PAGE = 16
FLASH_ATTN_BLOCK = 256
WORKSPACE_BYTES = 256 << 20


# ---- setup ------------------------------------------------------------------------------------------
class Case:
    """One (batch, context) point: the same K/V in vmem's virtual tensors and in a shuffled paged pool.

    k_virt / v_virt: [max_batch, max_seq, Hkv, D] vmem views (slots 0..batch-1 hold the requests);
    paged[block]: (k_pool, v_pool [num_blocks, block, Hkv, D], block_table [batch, context/block] int32).
    """

    def __init__(self, args, batch: int, context: int, device: torch.device):
        self.batch, self.context, self.device = batch, context, device
        self.hq, self.hkv, self.d, self.dtype = args.num_heads, args.num_kv_heads, args.head_dim, args.dtype
        spec = KVCacheSpec(num_layers=1, num_kv_heads=self.hkv, head_dim=self.d, dtype=self.dtype, max_batch=batch,
                           max_seq_len=context, page_bytes=args.page_bytes, layout="NHD")
        self.cache = make_cache("vmem", spec, backend="cuda" if device.type == "cuda" else "host",
                                device=device if device.type == "cuda" else None)
        self.slots = [self.cache.alloc_slot() for _ in range(batch)]
        if self.slots != list(range(batch)):
            raise RuntimeError("expected slots 0..%d, got %s" % (batch - 1, self.slots))
        self.cache.step({s: context for s in self.slots})
        self.k_virt, self.v_virt = self.cache.kv(0)
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (batch, context, self.hkv, self.d)
        k = (torch.randn(shape, generator=gen, device=device) * 0.5).to(self.dtype)
        v = torch.randn(shape, generator=gen, device=device).to(self.dtype)
        self.k_virt[:batch, :context] = k
        self.v_virt[:batch, :context] = v
        self.seqlens = torch.full((batch,), context, dtype=torch.int32, device=device)
        self.batch_idx = torch.arange(batch, dtype=torch.int32, device=device)
        self.paged = {}
        self._contents = (k, v)

    def paged_pool(self, block: int):
        """(k_pool, v_pool, block_table) with blocks of ``block`` tokens in shuffled order (block 0 unused)."""
        if block not in self.paged:
            k, v = self._contents
            per_req = self.context // block
            n = self.batch * per_req
            gen = torch.Generator(device="cpu").manual_seed(1)
            table = (torch.randperm(n, generator=gen) + 1).view(self.batch, per_req).to(torch.int32).to(self.device)
            pools = []
            for src in (k, v):
                pool = torch.zeros((n + 1, block, self.hkv, self.d), dtype=self.dtype, device=self.device)
                pool[table.long()] = src.view(self.batch, per_req, block, self.hkv, self.d)
                pools.append(pool)
            self.paged[block] = (pools[0], pools[1], table)
        return self.paged[block]

    def queries(self, mode: str) -> torch.Tensor:
        """[batch, 1 (decode) or context (prefill), Hq, D]."""
        gen = torch.Generator(device=self.device).manual_seed(2)
        s = 1 if mode == "decode" else self.context
        return torch.randn((self.batch, s, self.hq, self.d), generator=gen, device=self.device).to(self.dtype)

    def release(self):
        self._contents = None
        self.paged.clear()
        self.k_virt = self.v_virt = None
        self.cache.close()


# ---- kernels: each returns (vmem_fn, paged_fn, block); both fns return [batch, s, Hq, D] -----------
def kernel_flash_attn(case: Case, mode: str, q: torch.Tensor):
    fa = importlib.import_module("flash_attn")
    kp, vp, table = case.paged_pool(FLASH_ATTN_BLOCK)

    def vmem():
        return fa.flash_attn_with_kvcache(q, case.k_virt, case.v_virt, cache_seqlens=case.seqlens,
                                          cache_batch_idx=case.batch_idx, causal=True)

    def paged():
        return fa.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=case.seqlens, block_table=table, causal=True)

    return vmem, paged, FLASH_ATTN_BLOCK


def kernel_flashinfer(case: Case, mode: str, q: torch.Tensor):
    fi = importlib.import_module("flashinfer")
    page, b, c, dev = FLASHINFER_PAGE, case.batch, case.context, case.device
    kp, vp, table = case.paged_pool(page)
    pages_per_req = c // page
    token = case.hkv * case.d
    row_tokens = case.k_virt.stride(0) // token                  # the padded row (rows start on vmem pages)
    if row_tokens % page:
        raise ValueError("a slot's row of %d tokens is not a whole number of %d-token pages" % (row_tokens, page))
    rows = row_tokens // page
    pages_shape = (case.k_virt.shape[0] * rows, page, case.hkv, case.d)
    pages_stride = (page * token, token, case.d, 1)
    k_view = case.k_virt.as_strided(pages_shape, pages_stride)   # the virtual tensor as pages, no copy
    v_view = case.v_virt.as_strided(pages_shape, pages_stride)
    ident = (torch.arange(b, device=dev).view(-1, 1) * rows + torch.arange(pages_per_req, device=dev)).to(torch.int32)
    indptr = torch.arange(0, (b + 1) * pages_per_req, pages_per_req, dtype=torch.int32, device=dev)
    last = torch.full((b,), page, dtype=torch.int32, device=dev)
    wrappers = []
    for indices, kv in ((ident.reshape(-1), (k_view, v_view)), (table.reshape(-1), (kp, vp))):
        ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        if mode == "decode":
            w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
            w.plan(indptr, indices, last, case.hq, case.hkv, case.d, page, q_data_type=case.dtype,
                   kv_data_type=case.dtype)
            qq = q[:, 0]
        else:
            w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
            qo_indptr = torch.arange(0, (b + 1) * c, c, dtype=torch.int32, device=dev)
            w.plan(qo_indptr, indptr, indices, last, case.hq, case.hkv, case.d, page, causal=True,
                   q_data_type=case.dtype, kv_data_type=case.dtype)
            qq = q.reshape(b * c, case.hq, case.d)
        wrappers.append((w, qq, kv))

    def runner(w, qq, kv):
        return lambda: w.run(qq, kv).view(q.shape)

    return runner(*wrappers[0]), runner(*wrappers[1]), page


def kernel_sdpa_flash(case: Case, mode: str, q: torch.Tensor):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    kp, vp, table = case.paged_pool(FLASHINFER_PAGE)
    b, c = case.batch, case.context
    qt = q.transpose(1, 2)                                       # [B, Hq, s, D]
    causal = mode == "prefill"                                   # decode: the one query sees every key

    def restrict():                                              # a fresh context manager per call
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if case.device.type == "cuda" else contextlib.nullcontext()

    expand = []                                                  # set if this build's flash SDPA lacks GQA

    def run(k, v):
        if expand:
            k, v = (t.repeat_interleave(case.hq // case.hkv, dim=1) for t in (k, v))
        try:
            with restrict():
                return sdpa(qt, k, v, is_causal=causal, enable_gqa=case.hq != case.hkv).transpose(1, 2)
        except RuntimeError:
            if expand or case.hq == case.hkv:
                raise
            expand.append(True)                                  # both layouts pay the same expansion
            return run(k, v)

    def vmem():                                                  # strided views of slots 0..b-1, no copy
        return run(case.k_virt[:b, :c].transpose(1, 2), case.v_virt[:b, :c].transpose(1, 2))

    def paged():                                                 # SDPA needs dense K/V: gather the blocks
        idx = table.long()
        k = kp[idx].view(b, c, case.hkv, case.d).transpose(1, 2)
        v = vp[idx].view(b, c, case.hkv, case.d).transpose(1, 2)
        return run(k, v)

    return vmem, paged, FLASHINFER_PAGE


KERNEL_FNS = {"flash_attn": kernel_flash_attn, "flashinfer": kernel_flashinfer, "sdpa_flash": kernel_sdpa_flash}


def available(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "sdpa_flash":
        return True, torch.__version__
    if device.type != "cuda":
        return False, "needs CUDA"
    try:
        module = importlib.import_module(name)
    except Exception as exc:                                     # ImportError, or a broken CUDA extension
        return False, "%s: %s" % (type(exc).__name__, exc)
    return True, getattr(module, "__version__", "?")


# ---- timing -----------------------------------------------------------------------------------------
def median_ms(fn, device: torch.device, repeats: int, inner: int, warmup: int) -> float:
    """Median over ``repeats`` of the mean time of ``inner`` back-to-back calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times)


def measure(case: Case, kernel: str, mode: str, args) -> dict:
    q = case.queries(mode)
    vmem_fn, paged_fn, block = KERNEL_FNS[kernel](case, mode, q)
    out_v, out_p = vmem_fn().float(), paged_fn().float()
    diff = float((out_v - out_p).abs().max())
    inner = args.inner if mode == "decode" else max(1, args.inner // 4)
    t_v = median_ms(vmem_fn, case.device, args.repeats, inner, args.warmup)
    t_p = median_ms(paged_fn, case.device, args.repeats, inner, args.warmup)
    return dict(vmem_ms=t_v, paged_ms=t_p, paged_over_vmem=t_p / t_v, max_abs_diff=diff, paged_block=block,
                outputs_match=diff <= args.tolerance)


# ---- driver -----------------------------------------------------------------------------------------
def grid(args, mode: str) -> list[tuple[int, int]]:
    if args.cpu_smoke:
        return [(2, 256)] if mode == "decode" else [(1, 256)]
    if mode == "decode":
        batches = [1, 8, 32, 64] if args.full else [1, 16, 64]
        contexts = [1024, 4096, 16384] if args.full else [1024, 4096]
    else:
        batches = [1, 4, 8] if args.full else [1, 4]
        contexts = [1024, 4096, 8192] if args.full else [1024, 4096]
    return [(b, c) for b in batches for c in contexts]


def run(args) -> dict:
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", torch.cuda.current_device())
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise SystemExit("unknown kernels %s (choose from %s)" % (sorted(unknown), ", ".join(KERNELS)))
    status = {k: available(k, device) for k in kernels}
    result = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, python=platform.python_version(), cpu_smoke=args.cpu_smoke,
        kernels={k: {"available": ok, "version_or_reason": why} for k, (ok, why) in status.items()},
        config=dict(num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                    dtype=str(args.dtype).replace("torch.", ""), page_bytes=args.page_bytes, repeats=args.repeats,
                    inner=args.inner, warmup=args.warmup, flash_attn_block=FLASH_ATTN_BLOCK,
                    flashinfer_page=FLASHINFER_PAGE),
        results=[])
    for mode in ("decode", "prefill"):
        for batch, context in grid(args, mode):
            case = Case(args, batch, context, device)
            try:
                for kernel in kernels:
                    if not status[kernel][0]:
                        continue
                    row = dict(mode=mode, kernel=kernel, batch=batch, context=context)
                    try:
                        row.update(measure(case, kernel, mode, args))
                    except Exception as exc:                   # record and go on: one kernel's gap is a finding
                        row["error"] = "%s: %s" % (type(exc).__name__, str(exc)[:300])
                    result["results"].append(row)
                    print(json.dumps(row), flush=True)
            finally:
                case.release()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    result["summary"] = summarize(result["results"])
    return result


def summarize(rows: list[dict]) -> dict:
    """Geometric mean of paged / vmem per kernel and mode, and whether every output matched."""
    out = {}
    for row in rows:
        if "paged_over_vmem" not in row:
            continue
        key = "%s/%s" % (row["kernel"], row["mode"])
        out.setdefault(key, []).append(row)
    return {key: dict(cases=len(rs), geomean_paged_over_vmem=math.exp(statistics.fmean(
                math.log(r["paged_over_vmem"]) for r in rs)), all_outputs_match=all(r["outputs_match"] for r in rs))
            for key, rs in out.items()}


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no figure", file=sys.stderr)
        return
    rows = [r for r in result["results"] if "paged_over_vmem" in r]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, mode in zip(axes, ("decode", "prefill")):
        sel = [r for r in rows if r["mode"] == mode]
        labels = sorted({(r["batch"], r["context"]) for r in sel})
        kernels = sorted({r["kernel"] for r in sel})
        width = 0.8 / max(1, len(kernels))
        for i, kernel in enumerate(kernels):
            vals = {(r["batch"], r["context"]): r["paged_over_vmem"] for r in sel if r["kernel"] == kernel}
            ax.bar([j + i * width for j in range(len(labels))], [vals.get(lb, 0) for lb in labels], width,
                   label=kernel)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels(["b%d\nc%d" % lb for lb in labels], fontsize=8)
        ax.set_title("%s: paged time / vmem time (>1: vmem faster)" % mode)
        ax.legend(fontsize=8)
    fig.suptitle("%s, torch %s" % (result["device"], result["torch"]))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default=",".join(KERNELS), help="comma list of %s" % ", ".join(KERNELS))
    p.add_argument("--full", action="store_true", help="the bigger grid")
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--page-bytes", type=int, default=2 << 20, help="vmem page (CUDA granularity: 2 MiB)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--inner", type=int, default=20, help="calls per timed repeat (decode; prefill a quarter)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=2e-2, help="max |vmem - paged| output difference")
    p.add_argument("--cpu-smoke", action="store_true", help="no GPU: SDPA on the host backend at toy sizes")
    p.add_argument("--json", default="bench/out/gpu_attention.json")
    p.add_argument("--png", default="bench/out/gpu_attention.png")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if args.cpu_smoke:
        args.page_bytes, args.num_heads, args.num_kv_heads, args.head_dim = 4096, 4, 2, 32
        args.dtype, args.kernels, args.repeats, args.inner, args.warmup = torch.float32, "sdpa_flash", 3, 2, 1
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    if not args.cpu_smoke and not torch.cuda.is_available():
        result = {"skipped": "no CUDA device (torch %s); --cpu-smoke checks the script on the host" % torch.__version__}
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))
        return 0
    result = run(args)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    if args.png:
        plot(result, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
