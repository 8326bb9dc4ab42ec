"""End-to-end benchmark: output tokens/s and latency percentiles, vmem vs paged vs static.

The same requests (same token ids, same arrival times) run through the reference engine on each
cache, at the same physical KV budget, in one process, order rotated per repeat; medians of the
repeats are reported with ratios measured in the same run. Two workloads:

  azure          the bundled Azure conversation trace: a window, lengths scaled to the model,
                 arrivals compressed to a rate above what the machine serves (saturated)
  decode-heavy   synthetic: short prompts, long outputs, all requests at t=0 (vllm bench's rate=inf)

Optional outside peer: Hugging Face transformers' continuous batching (paged cache, CPU, fp32) on
the decode-heavy requests with a Llama of the same shape and random weights. It runs in another
interpreter (default .venv-hf/bin/python, `pip install torch==2.13.0 transformers==5.24.0`), with the
same KV budget (num_blocks of 16 tokens), max_requests_per_batch = max_batch and the same thread
count, and is skipped with the reason when that interpreter or transformers is missing.

    python bench/e2e.py                 # short default (a few minutes on 2 cores)
    python bench/e2e.py --repeats 5 --scale 2
Writes out/bench_e2e.json and out/bench_e2e.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("vmem", "paged", "static")


def workloads(args):
    from vmem.engine import workloads as wl
    from vmem.replay import ReplayConfig
    common = dict(model=args.model, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                  memory_bytes=None if args.memory_mib is None else int(args.memory_mib * 2**20),
                  page_bytes=args.page_bytes, seed=args.seed, warmup_requests=4)
    azure = ReplayConfig(start_s=600.0, duration_s=None, max_requests=int(48 * args.scale), rate=200.0,
                         arrivals="paced",
                         length_scale=0.125, output_scale=0.25, max_prompt_tokens=384, max_output_tokens=128,
                         **common)
    n = int(48 * args.scale)
    decode = wl.generate(n, rate=1e9, cv=1.0, seed=args.seed,
                         prompt_lengths=wl.ZipfLengths(0.5, 16, 64),
                         output_lengths=wl.ZipfLengths(0.0, 128, 320))
    decode = [r._replace(arrival_s=0.0) for r in decode]
    return {"azure": (azure, azure.requests()),
            "decode-heavy": (ReplayConfig(**common), decode)}


def run_workload(name, cfg, reqs, args):
    from vmem.replay import make_engine, make_prompts, run_trace, warm_up
    prompts = make_prompts(reqs, cfg.seed)
    per_kind = {k: [] for k in KINDS}
    for rep in range(args.repeats):
        order = KINDS[rep % 3:] + KINDS[:rep % 3]
        for kind in order:
            engine = make_engine(cfg, kind)
            try:
                warm_up(engine, cfg.warmup_requests)
                engine.reset_counters()
                res = run_trace(engine, reqs, prompts, label="%s/%s#%d" % (name, kind, rep), progress=args.progress)
            finally:
                engine.close()
            m = res.metrics
            per_kind[kind].append({
                "output_throughput": m["output_throughput"], "duration_s": m["duration_s"],
                "completed": m["completed"], "failed": m["failed"],
                "ttft_ms": m["ttft_ms"], "tpot_ms": m["tpot_ms"], "itl_ms": m["itl_ms"], "e2el_ms": m["e2el_ms"],
                "peak_physical_kv_bytes": res.peak_physical_kv_bytes, "peak_running": res.peak_running,
                "num_preemptions": res.num_preemptions, "map_calls": res.map_calls,
                "forward_s": res.stats.get("forward_s", 0.0), "map_wait_s": res.stats.get("map_wait_s", 0.0),
            })
            print("  %-13s %-6s rep %d: %.1f tok/s, TTFT p50 %.0f ms, TPOT p50 %.1f ms, peak running %d, "
                  "preemptions %d" % (name, kind, rep, m["output_throughput"], m["ttft_ms"]["p50"],
                                      m["tpot_ms"]["p50"], res.peak_running, res.num_preemptions), flush=True)
    summary = {k: _median_run(v) for k, v in per_kind.items()}
    tput = {k: summary[k]["output_throughput"] for k in KINDS}
    return {"num_requests": len(reqs), "total_output_tokens": sum(r.output_tokens for r in reqs),
            "runs": per_kind, "median": summary,
            "ratio_vmem_over_paged": tput["vmem"] / tput["paged"] if tput["paged"] else None,
            "ratio_vmem_over_static": tput["vmem"] / tput["static"] if tput["static"] else None}


def _median_run(runs):
    out = {}
    for key in ("output_throughput", "duration_s", "peak_physical_kv_bytes", "peak_running", "num_preemptions",
                "map_calls", "forward_s", "map_wait_s"):
        out[key] = statistics.median(r[key] for r in runs)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        out[key] = {q: statistics.median(r[key][q] for r in runs) for q in ("p50", "p90", "p99")}
    return out


# ---------------------------------------------------------------- outside peer: HF continuous batching

def hf_peer(cfg, reqs, args) -> dict:
    python = Path(args.hf_python)
    if not python.exists():
        return {"status": "skipped", "reason": "no interpreter at %s (make one: python3.11 -m venv .venv-hf && "
                ".venv-hf/bin/pip install torch==2.13.0 transformers==5.24.0)" % python}
    from vmem.engine.model import ModelConfig
    from vmem.replay import make_prompts, memory_budget
    mc = ModelConfig.preset(cfg.model, seed=cfg.seed)
    kv_tokens = memory_budget(cfg) // mc.kv_bytes_per_token
    job = {"model": {"vocab_size": mc.vocab_size, "hidden_size": mc.hidden_size, "num_layers": mc.num_layers,
                     "num_heads": mc.num_heads, "num_kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim,
                     "intermediate_size": mc.intermediate_size, "rope_theta": mc.rope_theta},
           "requests": [[p, r.output_tokens] for p, r in zip(make_prompts(reqs, cfg.seed), reqs)],
           "max_requests_per_batch": cfg.max_batch, "max_seq_len": cfg.max_seq_len, "kv_tokens": kv_tokens,
           "threads": _threads(), "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        proc = subprocess.run([str(python), __file__, "--hf-worker", str(job_path)], capture_output=True,
                              text=True, timeout=args.hf_timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": "failed", "reason": " | ".join(tail)}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def _threads() -> int:
    import torch
    return torch.get_num_threads()


def hf_worker(job_path: str) -> None:
    """Runs inside the transformers interpreter; prints one JSON line."""
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM
    import transformers
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    m = job["model"]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                      num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
                      num_key_value_heads=m["num_kv_heads"], head_dim=m["head_dim"], rope_theta=m["rope_theta"],
                      max_position_embeddings=job["max_seq_len"], bos_token_id=None, eos_token_id=None,
                      pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).float().eval()
    reqs = job["requests"]
    page = 16
    num_blocks = job["kv_tokens"] // page          # the same KV budget as the vmem/paged/static runs

    def run(batch):
        gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=max(g for _, g in batch))
        cb = ContinuousBatchingConfig(num_blocks=num_blocks, page_size=page, max_batch_tokens=512,
                                      max_requests_per_batch=job["max_requests_per_batch"], allow_block_sharing=False)
        outs, t0 = {}, time.perf_counter()
        with torch.inference_mode(), model.continuous_batching_context_manager(
                generation_config=gen, continuous_batching_config=cb, block=True, timeout=60) as mgr:
            for i, (ids, g) in enumerate(batch):
                mgr.add_request(ids, request_id="r%d" % i, max_new_tokens=g, eos_token_id=-1)
            while len(outs) < len(batch):
                r = mgr.get_result(timeout=1)
                if r is None:
                    if not mgr.is_running():
                        raise RuntimeError("continuous batching thread died")
                    continue
                if r.is_finished():
                    outs[r.request_id] = len(r.generated_tokens)
        return time.perf_counter() - t0, sum(outs.values())

    run([(p[:32], 8) for p, _ in reqs[:4]])      # warm-up
    times = []
    for _ in range(job["repeats"]):
        seconds, tokens = run(reqs)
        times.append(seconds)
    med = statistics.median(times)
    print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                      "seconds": times, "output_tokens": tokens, "output_throughput": tokens / med,
                      "config": {"page_size": page, "num_blocks": num_blocks, "max_batch_tokens": 512,
                                 "max_requests_per_batch": job["max_requests_per_batch"], "dtype": "float32",
                                 "attn": "sdpa", "threads": job["threads"]}}))


# ---------------------------------------------------------------- report

def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(result["workloads"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.25
    for j, kind in enumerate(KINDS):
        tput = [result["workloads"][n]["median"][kind]["output_throughput"] for n in names]
        ttft = [result["workloads"][n]["median"][kind]["ttft_ms"]["p50"] for n in names]
        xs = [i + (j - 1) * width for i in range(len(names))]
        axes[0].bar(xs, tput, width, label=kind)
        axes[1].bar(xs, ttft, width, label=kind)
    peer = result.get("hf_peer", {})
    if peer.get("status") == "ok":
        i = names.index("decode-heavy")
        axes[0].bar([i + 2 * width], [peer["output_throughput"]], width, label="HF CB (paged)", color="grey")
    for ax, title in zip(axes, ("output tokens/s (median)", "TTFT p50 (ms)")):
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale", type=float, default=3.0, help="requests = 48 x scale per workload")
    p.add_argument("--model", default="tiny")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--memory-mib", type=float, default=None, help="KV budget of every cache (default: max_batch // 8 full-length sequences)")
    p.add_argument("--page-bytes", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, the same for every engine")
    p.add_argument("--only", choices=("azure", "decode-heavy"), default=None)
    p.add_argument("--hf-python", default=str(ROOT / ".venv-hf" / "bin" / "python"))
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face peer")
    p.add_argument("--hf-timeout-s", type=float, default=900)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--json", default=str(ROOT / "out" / "bench_e2e.json"))
    p.add_argument("--png", default=str(ROOT / "out" / "bench_e2e.png"))
    p.add_argument("--hf-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hf_worker:
        return hf_worker(args.hf_worker)
    import torch
    torch.set_num_threads(args.threads)
    result = {"machine": {"cpus": os.cpu_count(), "threads": _threads(), "loadavg_start": os.getloadavg()},
              "args": {k: v for k, v in vars(args).items() if k != "hf_worker"}, "workloads": {}}
    wls = workloads(args)
    for name, (cfg, reqs) in wls.items():
        if args.only and name != args.only:
            continue
        print("workload %s: %d requests" % (name, len(reqs)), flush=True)
        result["workloads"][name] = run_workload(name, cfg, reqs, args)
    if not args.no_hf and "decode-heavy" in result["workloads"]:
        print("outside peer: HF transformers continuous batching ...", flush=True)
        cfg, reqs = wls["decode-heavy"]
        peer = hf_peer(cfg, reqs, args)
        if peer["status"] == "ok":
            vmem_tput = result["workloads"]["decode-heavy"]["median"]["vmem"]["output_throughput"]
            peer["ratio_vmem_over_hf"] = vmem_tput / peer["output_throughput"]
        result["hf_peer"] = peer
    result["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    plot(result, args.png)
    print()
    print("%-13s %10s %10s %10s %12s %12s" % ("workload", "vmem", "paged", "static", "vmem/paged", "vmem/static"))
    for name, w in result["workloads"].items():
        t = {k: w["median"][k]["output_throughput"] for k in KINDS}
        print("%-13s %10.1f %10.1f %10.1f %11.2fx %11.2fx" % (name, t["vmem"], t["paged"], t["static"],
                                                              w["ratio_vmem_over_paged"], w["ratio_vmem_over_static"]))
    if "hf_peer" in result:
        peer = result["hf_peer"]
        if peer["status"] == "ok":
            print("HF CB (transformers %s): %.1f tok/s; vmem / HF = %.2fx"
                  % (peer["transformers"], peer["output_throughput"], peer["ratio_vmem_over_hf"]))
        else:
            print("HF CB peer %s: %s" % (peer["status"], peer["reason"]))
    print("JSON: %s\nfigure: %s" % (args.json, args.png))


if __name__ == "__main__":
    main()
