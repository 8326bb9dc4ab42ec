"""The KV-cache allocator, measured: step latency, decode attention, capacity on the Azure trace.

Three parts, each measured against baselines in the same run (JSON out, PNG figures):

  step      step latency vs batch size and page size, synchronous vs async: decode steps of a batch whose
            requests grow one token per step (staggered lengths, so some cross a page boundary each
            step) with a fixed forward between steps (--compute sleep: host cores free, as with a GPU
            forward; matmul: a CPU forward); async maps step t+1 on the native worker during it.
            Reported: mean / p99 step time and the share of mapping time hidden.
  decode    decode attention time (one new token per request, one layer) through cache.attention on
            vmem (HND and NHD), paged (vLLM block tables, block 16, shuffled pool) and static caches,
            with the memory-bandwidth floor: KV bytes read / read bandwidth (a sum over a float32 buffer)
            timed round-robin with the four caches, so drifting load hits all alike.
            Targets: vmem >= 1.5x faster than paged at batch 32 context 4K; within 3x of the floor.
  capacity  the Azure LLM inference conversation trace (prompt + generated lengths) replayed through
            each cache under one memory budget: FCFS admission by can_allocate, one token per step,
            preemption of the newest request when a step runs out of memory. Reported: peak and mean
            concurrent requests, internal fragmentation. Targets: vmem >= 0.95x paged, >= 3x static.

    python bench/allocator.py                       # --quick grid, a few minutes on 2 cores
    python bench/allocator.py --full                # batch 1-64 x context 512-8K, more page sizes
    python bench/allocator.py --parts capacity --requests 5000 --json out.json --png out.png
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from vmem.allocator import KVCacheSpec, make_cache
from vmem.errors import VmemOutOfMemory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_medians  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
TRACE = next((p for p in (_ROOT.parent / "shared" / "traces" / "azure_llm_inference_2023",
                          _ROOT / "vmem" / "data" / "azure_llm_inference_2023")
              if (p / "AzureLLMInferenceTrace_conv.csv").exists()), _ROOT) / "AzureLLMInferenceTrace_conv.csv"
TARGETS = {"decode_speedup_vs_paged": 1.5, "decode_vs_floor": 3.0, "capacity_vs_paged": 0.95,
           "capacity_vs_static": 3.0}


# ---- part 1: step latency ---------------------------------------------------------------------

def sleep_compute(target_s: float):
    """A forward that leaves the host cores free, as a GPU forward does."""
    return lambda: time.sleep(target_s)


def calibrated_compute(target_s: float):
    """A matmul loop taking about target_s: a CPU forward, competing with the worker for cores."""
    a = torch.randn(256, 256)
    reps = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ a
        if time.perf_counter() - t0 >= target_s / 4 or reps > 1 << 16:
            break
        reps *= 2
    per = (time.perf_counter() - t0) / reps
    reps = max(1, int(target_s / per))

    def compute():
        for _ in range(reps):
            a @ a
    return compute


def bench_step(batch: int, page_bytes: int, async_map: bool, steps: int, compute, seed: int = 0) -> dict:
    spec = KVCacheSpec(num_layers=2, num_kv_heads=4, head_dim=128, dtype=torch.float16, max_batch=batch,
                       max_seq_len=1024 + steps + 64, page_bytes=page_bytes)
    rng = np.random.default_rng(seed)
    with make_cache("vmem", spec, backend="host", async_map=async_map) as cache:
        slots = [cache.alloc_slot() for _ in range(batch)]
        lengths = {s: int(rng.integers(1, 1024)) for s in slots}
        cache.step(lengths)
        for _ in range(8):                              # warm-up steps
            lengths = {s: n + 1 for s, n in lengths.items()}
            cache.step(lengths)
        before, counters_before = cache.stats(), cache.counters
        times = []
        for _ in range(steps):
            lengths = {s: n + 1 for s, n in lengths.items()}
            t0 = time.perf_counter()
            cache.step(lengths)
            times.append(time.perf_counter() - t0)
            if async_map:
                cache.prefetch({s: n + 1 for s, n in lengths.items()})
            compute()
        after, counters = cache.stats(), cache.counters
    times_us = np.array(times) * 1e6
    return {"batch": batch, "page_bytes": page_bytes, "async": async_map, "steps": steps,
            "step_mean_us": float(times_us.mean()), "step_p50_us": float(np.percentile(times_us, 50)),
            "step_p99_us": float(np.percentile(times_us, 99)),
            "pages_mapped": after.pages_mapped - before.pages_mapped,
            # time the step itself spent mapping or waiting for the worker
            "map_wait_seconds": (after.map_seconds - before.map_seconds)
            + counters["async_wait_seconds"] - counters_before["async_wait_seconds"],
            "prefetch_pages": counters["prefetch_pages"] - counters_before["prefetch_pages"]}


def part_step(args) -> list[dict]:
    make = sleep_compute if args.compute == "sleep" else calibrated_compute
    compute = make(args.compute_ms / 1e3)
    rows = []
    for page_bytes in args.step_pages:
        for batch in args.step_batches:
            pair = {}
            for async_map in (False, True):
                r = bench_step(batch, page_bytes, async_map, args.steps, compute)
                pair[async_map] = r
                rows.append(r)
            sync, asyn = pair[False], pair[True]
            # share of the synchronous mapping time that the worker took off the critical path
            asyn["hidden_share"] = (1.0 - asyn["map_wait_seconds"] / sync["map_wait_seconds"]
                                    if sync["map_wait_seconds"] else 0.0)
            asyn["step_speedup"] = sync["step_mean_us"] / asyn["step_mean_us"]
            print("step  page %7d B  batch %3d  sync %8.1f us (map %6.1f)  async %8.1f us (map+wait %6.1f)  "
                  "hidden %5.1f%%" % (page_bytes, batch, sync["step_mean_us"], 1e6 * sync["map_wait_seconds"] / args.steps,
                                      asyn["step_mean_us"], 1e6 * asyn["map_wait_seconds"] / args.steps,
                                      100 * asyn["hidden_share"]), flush=True)
    return rows


# ---- part 2: decode attention -------------------------------------------------------------------

def decode_setup(kind: str, layout: str, dtype, batch: int, ctx: int, heads=(32, 8, 128)):
    """A cache of one layer holding ``batch`` requests of ``ctx`` tokens, and a closure running one decode
    step of attention on it (1 new token per request, appended at ctx - 1). Returns (cache, fn)."""
    num_q, num_kv, head_dim = heads
    spec = KVCacheSpec(num_layers=1, num_kv_heads=num_kv, head_dim=head_dim, dtype=dtype, max_batch=batch,
                       max_seq_len=ctx, page_bytes=65536, layout=layout)
    cache = make_cache(kind, spec, backend="host")
    if kind == "paged":                                  # a steady-state pool: blocks scattered
        cache._free_blocks = deque(np.random.default_rng(0).permutation(cache.num_blocks).tolist())
    slots = [cache.alloc_slot() for _ in range(batch)]
    cache.step({s: ctx for s in slots})
    for t in cache.kv(0):
        t.normal_() if kind == "paged" else t[:batch].normal_()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 1, num_q, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, 1, num_kv, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, 1, num_kv, head_dim, generator=g).to(dtype)
    seqlens = torch.full((batch,), ctx - 1, dtype=torch.int32)
    idx = torch.tensor(slots, dtype=torch.int32)
    return cache, lambda: cache.attention(0, q, k, v, seqlens, idx)


DECODE_VARIANTS = [("vmem", "HND"), ("vmem", "NHD"), ("paged", "NHD"), ("static", "HND")]


def part_decode(args) -> dict:
    """Decode attention per case; the read-bandwidth floor is timed in the same round-robin."""
    rows = []
    floor_bytes = args.bandwidth_mb << 20
    floor_buf = torch.ones(floor_bytes // 4, dtype=torch.float32)
    for dtype in args.dtypes:
        dt = getattr(torch, dtype)
        for ctx in args.contexts:
            for batch in args.batches:
                kv_bytes = 2 * batch * ctx * 8 * 128 * dt.itemsize
                caches, fns = [], {"floor": floor_buf.sum}
                try:
                    for kind, layout in DECODE_VARIANTS:
                        cache, fn = decode_setup(kind, layout, dt, batch, ctx)
                        caches.append(cache)
                        fns[kind if kind == "paged" else "%s_%s" % (kind, layout)] = fn
                    med = interleaved_medians(fns, args.repeats)
                finally:
                    for cache in caches:
                        cache.close()
                bw = floor_bytes / med.pop("floor")
                row = {"dtype": dtype, "batch": batch, "context": ctx, "kv_bytes": kv_bytes,
                       "read_bandwidth_gbs": bw / 1e9, "floor_ms": kv_bytes / bw * 1e3}
                row.update({name + "_ms": t * 1e3 for name, t in med.items()})
                row["speedup_vs_paged"] = row["paged_ms"] / row["vmem_HND_ms"]
                row["vs_floor"] = row["vmem_HND_ms"] / row["floor_ms"]
                rows.append(row)
                print("decode %-8s ctx %5d batch %3d  vmem HND %8.2f  NHD %8.2f  paged %8.2f  static %8.2f  "
                      "floor %7.2f ms (%.1f GB/s)  x%.2f vs paged  %.2fx floor"
                      % (dtype, ctx, batch, row["vmem_HND_ms"], row["vmem_NHD_ms"], row["paged_ms"],
                         row["static_HND_ms"], row["floor_ms"], bw / 1e9, row["speedup_vs_paged"], row["vs_floor"]),
                      flush=True)
    return {"rows": rows}


# ---- part 3: capacity on the Azure trace ----------------------------------------------------------

def load_trace(path: Path, limit: int) -> list[tuple[int, int]]:
    with open(path, newline="") as f:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    return [(max(1, p), max(1, g)) for p, g in rows[:limit]]


def replay(kind: str, spec: KVCacheSpec, budget: int, requests, page_bytes: int) -> dict:
    """Offline FCFS replay; returns peak/mean concurrency and mean internal fragmentation."""
    cache = make_cache(kind, spec, memory_bytes=budget, backend="host")
    queue = deque(range(len(requests)))
    running: dict[int, list] = {}                      # slot -> [request, length now, final length]
    peak, conc, frag, preempted, steps = 0, [], [], 0, 0
    try:
        while queue or running:
            needs = {s: min(r[1] + 1, r[2]) for s, r in running.items()}
            while queue and cache.num_free_slots:       # admit: prompt + first token
                rid = queue[0]
                prompt, gen = requests[rid]
                slot = cache.alloc_slot(num_tokens=prompt + 1)
                if not cache.can_allocate({**needs, slot: prompt + 1}):
                    cache.free_slot(slot)
                    break
                queue.popleft()
                running[slot] = [rid, prompt, prompt + gen]
                needs[slot] = prompt + 1
            while True:
                try:
                    cache.step(needs)
                    break
                except VmemOutOfMemory:                 # preempt the newest request (recompute later)
                    slot = max(running, key=lambda s: running[s][0])
                    queue.appendleft(running.pop(slot)[0])
                    needs.pop(slot)
                    cache.free_slot(slot)
                    preempted += 1
            for s, n in needs.items():
                running[s][1] = n
            steps += 1
            peak = max(peak, len(running))
            conc.append(len(running))
            st = cache.stats()
            frag.append(st.internal_fragmentation)
            for s in [s for s, r in running.items() if r[1] >= r[2]]:
                running.pop(s)
                cache.free_slot(s)
    finally:
        cache.close()
    return {"kind": kind, "page_bytes": page_bytes, "peak_concurrent": peak,
            "mean_concurrent": float(np.mean(conc)), "internal_fragmentation": float(np.mean(frag)),
            "preemptions": preempted, "steps": steps}


def part_capacity(args) -> dict:
    requests = load_trace(Path(args.trace), args.requests)
    longest = max(p + g for p, g in requests)
    max_seq = 1 << (longest - 1).bit_length()
    budget = args.budget_mb << 20
    rows = []
    base = dict(num_layers=2, num_kv_heads=2, head_dim=128, dtype=torch.float16, max_seq_len=max_seq)
    for kind, page_bytes in [("paged", 0), ("static", 0)] + [("vmem", p) for p in args.capacity_pages]:
        spec = KVCacheSpec(max_batch=args.capacity_batch, page_bytes=page_bytes or 65536, **base)
        t0 = time.perf_counter()
        r = replay(kind, spec, budget, requests, page_bytes)
        r["seconds"] = time.perf_counter() - t0
        rows.append(r)
        print("capacity %-6s page %7d B  peak %4d  mean %7.1f  fragmentation %5.1f%%  preemptions %d  (%.1f s)"
              % (kind, page_bytes, r["peak_concurrent"], r["mean_concurrent"], 100 * r["internal_fragmentation"],
                 r["preemptions"], r["seconds"]), flush=True)
    paged = next(r for r in rows if r["kind"] == "paged")
    static = next(r for r in rows if r["kind"] == "static")
    for r in rows:
        r["vs_paged"] = r["peak_concurrent"] / paged["peak_concurrent"]
        r["vs_static"] = r["peak_concurrent"] / static["peak_concurrent"]
        r["mean_vs_paged"] = r["mean_concurrent"] / paged["mean_concurrent"]
    return {"trace": os.path.basename(args.trace), "requests": len(requests), "budget_bytes": budget,
            "max_seq_len": max_seq, "token_bytes": KVCacheSpec(max_batch=1, **base).token_bytes, "rows": rows}


# ---- report ----------------------------------------------------------------------------------------

def verdicts(result: dict) -> dict:
    out = {}
    steps = [r for r in result.get("step") or [] if r["async"]]
    if steps:
        out["async_hidden_share"] = {"%dK_b%d" % (r["page_bytes"] >> 10, r["batch"]): round(r["hidden_share"], 2)
                                     for r in steps}
    dec = result.get("decode")
    if dec:
        key = [r for r in dec["rows"] if r["batch"] == 32 and r["context"] == 4096]
        if key:
            out["decode_speedup_vs_paged_b32_4k"] = {r["dtype"]: round(r["speedup_vs_paged"], 2) for r in key}
            out["decode_vs_floor_b32_4k"] = {r["dtype"]: round(r["vs_floor"], 2) for r in key}
        out["decode_vs_floor_worst"] = round(max(r["vs_floor"] for r in dec["rows"]), 2)
    cap = result.get("capacity")
    if cap:
        best = max((r for r in cap["rows"] if r["kind"] == "vmem"), key=lambda r: r["peak_concurrent"])
        out["capacity_vs_paged"] = {str(r["page_bytes"]): round(r["vs_paged"], 3) for r in cap["rows"]
                                    if r["kind"] == "vmem"}
        out["capacity_vs_static"] = round(best["vs_static"], 2)
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = [p for p in ("step", "decode", "capacity") if result.get(p)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), squeeze=False)
    for ax, part in zip(axes[0], parts):
        if part == "step":
            rows = result["step"]
            for page in sorted({r["page_bytes"] for r in rows}):
                for asy, style in ((False, "-o"), (True, "--s")):
                    sel = [r for r in rows if r["page_bytes"] == page and r["async"] == asy]
                    ax.plot([r["batch"] for r in sel], [r["step_mean_us"] for r in sel], style,
                            label="%d KiB %s" % (page >> 10, "async" if asy else "sync"))
            ax.set_xscale("log", base=2), ax.set_yscale("log")
            ax.set_xlabel("batch"), ax.set_ylabel("mean step time (us)"), ax.set_title("step latency")
        elif part == "decode":
            rows = result["decode"]["rows"]
            ctx = 4096 if any(r["context"] == 4096 for r in rows) else rows[-1]["context"]
            for dtype in sorted({r["dtype"] for r in rows}):
                sel = [r for r in rows if r["context"] == ctx and r["dtype"] == dtype]
                xs = [r["batch"] for r in sel]
                for key, style in (("vmem_HND_ms", "-o"), ("vmem_NHD_ms", "-^"), ("paged_ms", "-x"),
                                   ("static_HND_ms", ":"), ("floor_ms", "k--")):
                    ax.plot(xs, [r[key] for r in sel], style, label="%s %s" % (key[:-3], dtype))
            ax.set_xscale("log", base=2), ax.set_yscale("log")
            ax.set_xlabel("batch"), ax.set_ylabel("ms per layer"), ax.set_title("decode attention, context %d" % ctx)
        else:
            rows = result["capacity"]["rows"]
            labels = [r["kind"] + ("\n%d KiB" % (r["page_bytes"] >> 10) if r["page_bytes"] else "") for r in rows]
            ax.bar(labels, [r["peak_concurrent"] for r in rows], label="peak")
            ax.bar(labels, [r["mean_concurrent"] for r in rows], width=0.4, label="mean")
            ax.set_ylabel("concurrent requests"), ax.set_title("capacity, Azure conv trace")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the full grid (long)")
    p.add_argument("--quick", action="store_true", help="the default small grid")
    p.add_argument("--parts", default="step,decode,capacity")
    p.add_argument("--json", default="bench/out/allocator.json")
    p.add_argument("--png", default="bench/out/allocator.png")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per step-latency case")
    p.add_argument("--compute-ms", type=float, default=2.0, help="compute between steps (async hides behind it)")
    p.add_argument("--compute", choices=["sleep", "matmul"], default="sleep",
                   help="the forward between steps: sleep (host cores free, as with a GPU forward) or a "
                        "CPU matmul loop (competes with the worker thread for the cores)")
    p.add_argument("--requests", type=int, default=None, help="trace requests to replay")
    p.add_argument("--budget-mb", type=int, default=256)
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--batches", default=None, help="decode batches, e.g. 1,8,32 (overrides the grid)")
    p.add_argument("--contexts", default=None, help="decode contexts, e.g. 512,4096")
    p.add_argument("--dtypes", default=None, help="decode dtypes, e.g. bfloat16,float32")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's); 1 keeps a shared, busy machine from stalling "
                        "OpenMP regions on a descheduled sibling thread")
    return p


def _ints(text):
    return [int(x) for x in text.split(",")] if text else None


def configure(args) -> None:
    full = args.full
    args.repeats = args.repeats or (7 if full else 5)
    args.steps = args.steps or (512 if full else 192)
    args.step_batches = [1, 4, 16, 32, 64] if full else [1, 8, 32]
    args.step_pages = [16 << 10, 64 << 10, 256 << 10, 2 << 20] if full else [16 << 10, 64 << 10, 256 << 10]
    args.batches = _ints(args.batches) or ([1, 4, 16, 32, 64] if full else [1, 8, 32])
    args.contexts = _ints(args.contexts) or ([512, 1024, 2048, 4096, 8192] if full else [512, 4096])
    args.dtypes = args.dtypes.split(",") if args.dtypes else ["bfloat16", "float32"]
    args.bandwidth_mb = 512 if full else 256
    args.requests = args.requests or (19366 if full else 1500)
    args.capacity_pages = [16 << 10, 64 << 10, 256 << 10] if full else [16 << 10, 64 << 10]
    args.capacity_batch = 512


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "load_avg": os.getloadavg()},
              "compute": args.compute,
              "grid": "full" if args.full else "quick", "targets": TARGETS}
    t0 = time.perf_counter()
    if "step" in parts:
        result["step"] = part_step(args)
    if "decode" in parts:
        result["decode"] = part_decode(args)
    if "capacity" in parts:
        result["capacity"] = part_capacity(args)
    result["verdicts"] = verdicts(result)
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result["verdicts"], indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        plot(result, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
