"""Per-page map / unmap cost of the native layer against the raw floor, measured in one run.

Modes (all on the same reservation layout and pool, pages already allocated in the pool):

    raw          a bare C loop of the backend's own calls, one per page (host: mmap with the exact flags
                 vmem_map uses; cuda: cuMemMap + cuMemSetAccess), compiled into the extension
    batched      Reservation.map / unmap: one native call for all N pages
    per_call     one Reservation.map / unmap call per page from Python
    contiguous   batched, but virtual and physical pages contiguous: runs coalesce into one OS call
    async        AsyncMapper.submit + wait of the batched map on the native worker thread; the JSON
                 also gives the submit alone (what a caller pays while the worker maps)

``raw``, ``batched`` and ``per_call`` use scattered pages (every other virtual page, physical pages
shuffled) so that nothing coalesces and each mode issues the same N OS calls. Each repeat runs every mode
once (interleaved, the order rotating, so drift hits all alike) after a warm-up repeat; figures are
medians over repeats of (call time / N), and ratios are medians of the per-repeat ratios (drift cancels).
Target: batched map within 1.25x of raw.

    python bench/native_map.py                      # host, 4 KiB / 64 KiB / 2 MiB, ~10 s
    python bench/native_map.py --json out.json --png out.png --repeats 9 --scale 4
    python bench/native_map.py --backend cuda       # GPU: 2 MiB pages, cuMemMap / SetAccess / Unmap
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from vmem.backends import get_backend
from vmem._native import ffi, lib

TARGET = 1.25
HOST_SIZES = [(4 << 10, 4096), (64 << 10, 4096), (2 << 20, 256)]  # (page_bytes, pages at scale 1)


def _ptr(a):
    return ffi.from_buffer("int64_t[]", a)


def _layout(n, rng):
    virt = np.arange(n, dtype=np.int64) * 2               # every other page: no two adjacent
    phys = rng.permutation(n).astype(np.int64)              # shuffled: no contiguous offsets
    return virt, phys


def _time(fn):
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


def bench_size(backend, page_bytes, n, repeats, rng):
    """Medians of ns per page for each mode (map and unmap) at one page size."""
    virt, phys = _layout(n, rng)
    cvirt, cphys = np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64)
    resv = backend.reserve(2 * n * page_bytes, page_bytes)
    raw_resv = backend.reserve(2 * n * page_bytes, page_bytes)  # raw calls bypass vmem's table
    pool = backend.create_pool(page_bytes, n)
    cuda = backend.name == "cuda"
    samples = {m: {"map": [], "unmap": []} for m in ("raw", "batched", "per_call", "contiguous", "async")}
    extra = {"cuMemMap": [], "cuMemSetAccess": []}
    one_v = [virt[i:i + 1] for i in range(n)]
    one_p = [phys[i:i + 1] for i in range(n)]

    def raw_map():
        if cuda:
            ns = ffi.new("uint64_t[2]")
            rc = lib.vmem_raw_cuda_map(pool._h, raw_resv.address, _ptr(virt), _ptr(phys), n, page_bytes, ns)
            extra["cuMemMap"].append(ns[0] / n)
            extra["cuMemSetAccess"].append(ns[1] / n)
        else:
            rc = lib.vmem_raw_host_map(pool._h, raw_resv.address, _ptr(virt), _ptr(phys), n, page_bytes)
        assert rc == 0, rc

    def raw_unmap():
        if cuda:
            rc = lib.vmem_raw_cuda_unmap(backend._h, raw_resv.address, _ptr(virt), n, page_bytes)
        else:
            rc = lib.vmem_raw_host_unmap(raw_resv.address, _ptr(virt), n, page_bytes)
        assert rc == 0, rc

    def per_call_map():
        for v, p in zip(one_v, one_p):
            resv.map(v, pool, p)

    def per_call_unmap():
        for v in one_v:
            resv.unmap(v)

    mapper = backend.async_mapper()
    submit_ns = []

    def async_map():  # what the caller waits for is only the submit; the rest overlaps its compute
        t0 = time.perf_counter_ns()
        ticket = mapper.submit(resv, virt, pool, phys)
        submit_ns.append((time.perf_counter_ns() - t0) / n)
        mapper.wait(ticket)

    modes = {
        "raw": (raw_map, raw_unmap),
        "async": (async_map, lambda: mapper.wait(mapper.submit_unmap(resv, virt))),
        "batched": (lambda: resv.map(virt, pool, phys), lambda: resv.unmap(virt)),
        "per_call": (per_call_map, per_call_unmap),
        "contiguous": (lambda: resv.map(cvirt, pool, cphys), lambda: resv.unmap(cvirt)),
    }
    # warm-up: gives every pool page its memory and faults in code paths; counts runs per map call
    # (host: one mmap each; cuda: one cuMemSetAccess each, cuMemMap stays per page)
    runs = {}
    for m, (do_map, do_unmap) in modes.items():
        before = resv.stats()["map_ops"]
        do_map()
        runs[m] = resv.stats()["map_ops"] - before if m != "raw" else n
        do_unmap()
    extra = {k: [] for k in extra}
    del submit_ns[:]
    names = list(modes)
    for rep in range(repeats):
        k = rep % len(names)
        for m in names[k:] + names[:k]:  # rotate the order: no mode always goes first
            do_map, do_unmap = modes[m]
            samples[m]["map"].append(_time(do_map) / n)
            samples[m]["unmap"].append(_time(do_unmap) / n)
    mapper.close()
    resv.close()
    raw_resv.close()
    pool.close()
    out = {
        "page_bytes": page_bytes,
        "num_pages": n,
        "modes": {m: {"map_ns_per_page": statistics.median(s["map"]),
                      "unmap_ns_per_page": statistics.median(s["unmap"]),
                      "map_samples": s["map"], "unmap_samples": s["unmap"]} for m, s in samples.items()},
        "map_runs_per_mode": runs,
        "async_submit_ns_per_page": statistics.median(submit_ns),
    }
    if cuda:
        out["raw_breakdown_ns_per_page"] = {k: statistics.median(v) for k, v in extra.items() if v}
    def paired(mode, kind):  # median over repeats of (mode / raw) within the same repeat: drift cancels
        return statistics.median(a / b for a, b in zip(samples[mode][kind], samples["raw"][kind]))

    out["ratios"] = {
        "batched_map_vs_raw": paired("batched", "map"),
        "batched_unmap_vs_raw": paired("batched", "unmap"),
        "per_call_map_vs_raw": paired("per_call", "map"),
        "contiguous_map_vs_raw": paired("contiguous", "map"),
        "async_map_vs_raw": paired("async", "map"),
    }
    return out


def table(results) -> str:
    """Markdown: medians per page; "vs raw" is the median of per-repeat ratios."""
    lines = ["| page | mode | map µs/page | unmap µs/page | map vs raw | unmap vs raw |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for m, s in r["modes"].items():
            ratio = 1.0 if m == "raw" else r["ratios"]["%s_map_vs_raw" % m]
            uratio = "1.00x" if m == "raw" else (
                "%.2fx" % r["ratios"]["batched_unmap_vs_raw"] if m == "batched" else "")
            lines.append("| %s | %s | %.2f | %.2f | %.2fx | %s |" % (
                _size(r["page_bytes"]), m, s["map_ns_per_page"] / 1e3, s["unmap_ns_per_page"] / 1e3,
                ratio, uratio))
        lines.append("| %s | async, submit alone | %.3f | | | |" % (
            _size(r["page_bytes"]), r["async_submit_ns_per_page"] / 1e3))
    return "\n".join(lines)


def _size(b):
    return "%d MiB" % (b >> 20) if b >= 1 << 20 else "%d KiB" % (b >> 10)


def plot(results, path, backend_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["raw", "batched", "per_call", "contiguous", "async"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.16
    for ax, kind in zip(axes, ("map", "unmap")):
        for k, m in enumerate(modes):
            ys = [r["modes"][m]["%s_ns_per_page" % kind] / 1e3 for r in results]
            xs = [i + (k - 2) * width for i in range(len(results))]
            ax.bar(xs, ys, width, label=m)
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels([_size(r["page_bytes"]) for r in results])
        ax.set_yscale("log")
        ax.set_ylabel("µs per page (median)")
        ax.set_title("%s %s per page" % (backend_name, kind))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("vmem native map/unmap vs the raw syscall/driver floor (same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="host", choices=["host", "cuda"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the number of pages per size")
    ap.add_argument("--json", help="write JSON here (default: stdout)")
    ap.add_argument("--png", default=None, help="figure path (default: next to --json, else none)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    backend = get_backend(args.backend)
    rng = np.random.default_rng(args.seed)
    if backend.name == "cuda":
        g = backend.granularity_bytes
        sizes = [(g, 256)]
    else:
        sizes = HOST_SIZES
    results = [bench_size(backend, pb, max(8, int(n * args.scale)), args.repeats, rng) for pb, n in sizes]
    batched = [r["ratios"]["batched_map_vs_raw"] for r in results]
    report = {
        "benchmark": "native_map",
        "backend": backend.name,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count()},
        "info": backend.info(),
        "repeats": args.repeats,
        "target_batched_map_vs_raw": TARGET,
        "meets_target": all(x <= TARGET for x in batched),
        "results": results,
        "table": table(results),
    }
    text = json.dumps(report, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)
    png = args.png or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    if png:
        plot(results, png, backend.name)
    print(report["table"], file=sys.stderr)
    print("batched map vs raw: %s (target <= %.2fx): %s" % (
        ", ".join("%.3fx" % x for x in batched), TARGET, "met" if report["meets_target"] else "NOT met"),
        file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
