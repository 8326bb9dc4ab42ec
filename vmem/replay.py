"""`vmem replay`: run a trace through the engine on the wall clock, for one or several caches.

Arrivals (``ReplayConfig.arrivals``):
  burst  every request is waiting at t = 0 (the default, what `make demo` shows): each cache runs at
         saturation, so at one physical budget its throughput and queueing latency follow from how many
         requests it fits at once; stable across runs and machines, as nothing depends on a measured rate;
  paced  arrivals at `load` x the static cache's capacity, measured first here (or at `rate` req/s);
  trace  the trace's own timing x `time_scale`.
Requests become waiting when their (scaled) arrival time passes on the wall clock; the engine runs
for real in this thread and every latency is measured on the same monotonic clock, as a client would
(`metrics.py`). With several cache kinds, each runs the same requests (same token ids, same arrival
times) on the same physical KV budget, one after the other, after a short warm-up of its own.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vmem.allocator import CACHE_KINDS
from vmem.engine import workloads
from vmem.engine.engine import Engine, Request, SamplingParams, build_engine
from vmem.engine.metrics import RequestRecord, compute_metrics

logger = logging.getLogger(__name__)

ARRIVALS = ("burst", "paced", "trace")


@dataclass
class ReplayConfig:
    """What to replay and on what. Lengths are scaled to the model's max_seq_len, time by time_scale / rate."""
    trace: str | None = None               # CSV path; None = bundled Azure conversation trace
    synthetic: int = 0                     # > 0: a seeded synthetic workload of this many requests instead
    start_s: float = 600.0                 # window of the trace, original seconds
    duration_s: float | None = 180.0
    max_requests: int | None = 320
    arrivals: str = "burst"                # burst | paced | trace (module docstring)
    time_scale: float = 1.0                # arrivals "trace": multiply the trace's arrival times
    rate: float | None = None              # arrivals "paced": this mean req/s instead of load x capacity
    load: float | None = 1.2               # arrivals "paced": load x the static cache's measured capacity
    length_scale: float = 0.125
    output_scale: float | None = 0.25
    max_prompt_tokens: int = 384
    max_output_tokens: int = 128
    model: str = "small"                   # weights large enough that batching pays, as it does on real models
    max_batch: int = 32
    max_seq_len: int = 512
    memory_bytes: int | None = None        # None: room for max_batch // 8 full-length sequences
    page_bytes: int | None = 4096
    max_num_batched_tokens: int = 512
    prefill_chunk_tokens: int = 256
    backend: str = "auto"
    seed: int = 0
    threads: int = 1                       # torch intra-op threads (1 is fastest and steadiest for small models)
    warmup_requests: int = 4
    sample_interval_s: float = 0.05        # timeline resolution
    slos_ms: dict | None = None            # e.g. {"ttft": 1000, "tpot": 50}: goodput counts requests meeting all

    def __post_init__(self):
        if self.arrivals not in ARRIVALS:
            from vmem.errors import VmemInvalidArgument
            raise VmemInvalidArgument("arrivals must be one of %s, got %r" % (", ".join(ARRIVALS), self.arrivals))

    def requests(self) -> list[workloads.TraceRequest]:
        reqs = self._requests()
        if self.arrivals == "burst":
            reqs = [r._replace(arrival_s=0.0) for r in reqs]
        return reqs

    def _requests(self) -> list[workloads.TraceRequest]:
        if self.synthetic > 0:
            reqs = workloads.generate(self.synthetic, rate=self.rate or 4.0, cv=1.0, seed=self.seed,
                                      prompt_lengths=workloads.ZipfLengths(0.6, 16, self.max_prompt_tokens),
                                      output_lengths=workloads.ZipfLengths(0.3, 16, self.max_output_tokens))
            return workloads.scale_trace(reqs, max_requests=self.max_requests, time_scale=self.time_scale)
        trace = workloads.load_trace(self.trace)
        # clip so that every prompt + output fits max_seq_len
        max_output = min(self.max_output_tokens, self.max_seq_len - 1)
        max_prompt = min(self.max_prompt_tokens, self.max_seq_len - max_output)
        return workloads.scale_trace(
            trace, start_s=self.start_s, duration_s=self.duration_s, max_requests=self.max_requests,
            time_scale=self.time_scale, rate=self.rate, length_scale=self.length_scale,
            output_scale=self.output_scale, max_prompt_tokens=max_prompt, max_output_tokens=max_output)


@dataclass
class RunResult:
    kind: str
    metrics: dict
    stats: dict
    peak_physical_kv_bytes: int
    peak_used_kv_bytes: int
    peak_running: int
    mean_running: float                            # over the samples while work was left
    num_preemptions: int
    map_calls: int
    num_skipped: int
    timeline: dict = field(default_factory=dict)   # t_s, physical_kv_bytes, running, waiting


def _physical_bytes(stats: dict) -> int:
    """Physical KV memory a cache holds: what vmem has mapped (free pool pages cost nothing until
    mapped); the paged pool and the static slots are allocated whole up front."""
    return int(stats["mapped_bytes"] if stats["kind"] == "vmem" else stats["total_bytes"])


def _map_calls(stats: dict) -> int:
    return int(stats.get("map_calls", 0))


def memory_budget(cfg: ReplayConfig) -> int:
    """The physical KV budget every cache gets: cfg.memory_bytes, or room for max_batch // 8 sequences of
    max_seq_len, so static holds that many while vmem and paged pack in more of the real, shorter ones."""
    if cfg.memory_bytes is not None:
        return cfg.memory_bytes
    from vmem.engine.model import ModelConfig
    token_bytes = ModelConfig.preset(cfg.model, seed=cfg.seed).kv_bytes_per_token
    return max(cfg.max_batch // 8, 1) * cfg.max_seq_len * token_bytes


def make_engine(cfg: ReplayConfig, kind: str) -> Engine:
    return build_engine(cfg.model, kind, memory_bytes=memory_budget(cfg), max_batch=cfg.max_batch,
                        max_seq_len=cfg.max_seq_len, backend=cfg.backend, seed=cfg.seed,
                        page_bytes=cfg.page_bytes if kind == "vmem" else None,
                        max_num_batched_tokens=cfg.max_num_batched_tokens,
                        prefill_chunk_tokens=cfg.prefill_chunk_tokens)


def make_prompts(reqs: list[workloads.TraceRequest], seed: int, vocab_size: int = 256) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [workloads.prompt_ids(r.prompt_tokens, rng, vocab_size) for r in reqs]


def warm_up(engine: Engine, num_requests: int) -> None:
    """A few short requests so first-call costs (allocator, kernels) stay out of the measurement."""
    rng = np.random.default_rng(12345)
    for i in range(num_requests):
        engine.add_request(Request(f"warmup-{i}", workloads.prompt_ids(48 + 16 * i, rng),
                                   SamplingParams(max_tokens=8, ignore_eos=True)))
    while engine.has_work():
        engine.step()


def run_trace(engine: Engine, reqs: list[workloads.TraceRequest], prompts: list[list[int]], *,
              label: str = "", progress: bool = True, sample_interval_s: float = 0.05,
              slos_ms: dict | None = None) -> RunResult:
    """Replay `reqs` on the wall clock through `engine`; returns metrics and a memory timeline."""
    todo = [(i, r) for i, r in enumerate(reqs) if r.output_tokens > 0 and
            r.prompt_tokens + r.output_tokens <= engine.max_seq_len]
    num_skipped = len(reqs) - len(todo)
    records: dict[str, RequestRecord] = {}
    timeline = {"t_s": [], "physical_kv_bytes": [], "used_kv_bytes": [], "running": [], "waiting": []}
    bar = _Progress(len(todo), label, enabled=progress)
    peak_running = 0
    map_calls_before = _map_calls(engine.stats())
    next_sample = 0.0
    t_start = time.monotonic()
    pos = 0
    while pos < len(todo) or engine.has_work():
        now = time.monotonic()
        while pos < len(todo) and t_start + todo[pos][1].arrival_s <= now:
            i, r = todo[pos]
            rid = f"req-{i}"
            arrival = t_start + r.arrival_s
            records[rid] = RequestRecord(rid, arrival, r.prompt_tokens)
            engine.add_request(Request(rid, prompts[i], SamplingParams(max_tokens=r.output_tokens,
                                                                       ignore_eos=True), arrival))
            pos += 1
        if not engine.has_work():
            time.sleep(max(0.0, min(t_start + todo[pos][1].arrival_s - time.monotonic(), 0.1)))
            continue
        outputs = engine.step()
        now = time.monotonic()
        for out in outputs:
            rec = records[out.request_id]
            rec.token_times.extend([now] * len(out.new_token_ids))
            if out.finished:
                rec.finish_reason = out.finish_reason
                bar.update()
        peak_running = max(peak_running, engine.num_running)
        if now - t_start >= next_sample:
            stats = engine.stats()
            timeline["t_s"].append(now - t_start)
            timeline["physical_kv_bytes"].append(_physical_bytes(stats))
            timeline["used_kv_bytes"].append(int(stats["used_bytes"]))
            timeline["running"].append(engine.num_running)
            timeline["waiting"].append(engine.num_waiting)
            next_sample = now - t_start + sample_interval_s
    bar.close()
    end = max((r.token_times[-1] for r in records.values() if r.token_times), default=t_start)
    first = t_start + todo[0][1].arrival_s if todo else t_start
    stats = engine.stats()
    metrics = compute_metrics(list(records.values()), end - first, slos_ms=slos_ms)
    return RunResult(engine.cache.kind, metrics, stats,
                     peak_physical_kv_bytes=max([_physical_bytes(stats)] + timeline["physical_kv_bytes"]),
                     peak_used_kv_bytes=max([int(stats["peak_used_pages"]) * int(stats["page_bytes"])]
                                            + timeline["used_kv_bytes"]),
                     peak_running=peak_running,
                     mean_running=float(np.mean(timeline["running"])) if timeline["running"] else 0.0,
                     num_preemptions=engine.num_preemptions,
                     map_calls=_map_calls(stats) - map_calls_before, num_skipped=num_skipped, timeline=timeline)


def calibrate(cfg: ReplayConfig, reqs, prompts, *, num_requests: int = 48) -> dict:
    """Requests/s the static cache sustains here: the first `num_requests` of the workload at once.

    Machines differ by 5x or more (a quiet 2-core box vs a loaded one), so a fixed rate would either
    idle every cache or drown them all; pacing at a multiple of this keeps the comparison meaningful.
    """
    probe = [r._replace(arrival_s=0.0) for r in reqs[:num_requests]]
    engine = make_engine(cfg, "static")
    try:
        warm_up(engine, cfg.warmup_requests)
        res = run_trace(engine, probe, prompts, label="calibrate", progress=False)
    finally:
        engine.close()
    capacity = res.metrics["completed"] / res.metrics["duration_s"]
    return {"static_capacity_req_s": capacity, "load": cfg.load, "rate": cfg.load * capacity,
            "probe_requests": len(probe)}


def replay(cfg: ReplayConfig, kinds=CACHE_KINDS, *, progress: bool = True) -> dict:
    """Run the same requests through each cache kind; returns {"config", "workload", "runs": {kind: ...}}."""
    reqs = cfg.requests()
    if not reqs:
        from vmem.errors import VmemInvalidArgument
        raise VmemInvalidArgument("the trace window holds no requests; widen --duration or move --start")
    prompts = make_prompts(reqs, cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    calibration = None
    if cfg.arrivals == "paced" and cfg.rate is None and cfg.load and cfg.synthetic <= 0 and len(reqs) > 1:
        calibration = calibrate(cfg, reqs, prompts)
        reqs = workloads.scale_trace(reqs, rate=calibration["rate"])
        if progress:
            sys.stderr.write("calibrated: static serves %.1f req/s here; replaying at %.1f req/s (load %.2f)\n"
                             % (calibration["static_capacity_req_s"], calibration["rate"], cfg.load))
    runs = {}
    for kind in kinds:
        engine = make_engine(cfg, kind)
        try:
            warm_up(engine, cfg.warmup_requests)
            engine.reset_counters()
            runs[kind] = run_trace(engine, reqs, prompts, label=kind, progress=progress,
                                   sample_interval_s=cfg.sample_interval_s, slos_ms=cfg.slos_ms)
        finally:
            engine.close()
    result = {"config": asdict(cfg), "memory_bytes": memory_budget(cfg), "calibration": calibration,
              "workload": workloads.summarize(reqs), "runs": {k: asdict(v) for k, v in runs.items()}}
    if "vmem" in runs and len(runs) > 1:
        result["ratios"] = ratios(result)
    return result


# ---------------------------------------------------------------- report

ROWS = [
    ("output tok/s", lambda r: r["metrics"]["output_throughput"], "{:.1f}"),
    ("requests done", lambda r: "%d/%d" % (r["metrics"]["completed"], r["metrics"]["num_requests"]), "{}"),
    ("TTFT p50 ms", lambda r: r["metrics"]["ttft_ms"]["p50"], "{:.0f}"),
    ("TTFT p99 ms", lambda r: r["metrics"]["ttft_ms"]["p99"], "{:.0f}"),
    ("TPOT p50 ms", lambda r: r["metrics"]["tpot_ms"]["p50"], "{:.1f}"),
    ("TPOT p99 ms", lambda r: r["metrics"]["tpot_ms"]["p99"], "{:.1f}"),
    ("ITL p50 ms", lambda r: r["metrics"]["itl_ms"]["p50"], "{:.1f}"),
    ("ITL p99 ms", lambda r: r["metrics"]["itl_ms"]["p99"], "{:.1f}"),
    ("E2E p50 ms", lambda r: r["metrics"]["e2el_ms"]["p50"], "{:.0f}"),
    ("E2E p99 ms", lambda r: r["metrics"]["e2el_ms"]["p99"], "{:.0f}"),
    ("peak physical KV MiB", lambda r: r["peak_physical_kv_bytes"] / 2**20, "{:.2f}"),
    ("peak used KV MiB", lambda r: r["peak_used_kv_bytes"] / 2**20, "{:.2f}"),
    ("mean running requests", lambda r: r["mean_running"], "{:.1f}"),
    ("peak running requests", lambda r: r["peak_running"], "{}"),
    ("preemptions", lambda r: r["num_preemptions"], "{}"),
    ("map calls", lambda r: r["map_calls"], "{}"),
]


def format_table(result: dict) -> str:
    runs = result["runs"]
    kinds = list(runs)
    rows = list(ROWS)
    if all("goodput" in r["metrics"] for r in runs.values()):
        rows.insert(2, ("goodput req/s", lambda r: r["metrics"]["goodput"], "{:.2f}"))
    width = max(len(name) for name, _, _ in rows)
    lines = ["%-*s  %s" % (width, "", "  ".join("%10s" % k for k in kinds))]
    for name, get, fmt in rows:
        lines.append("%-*s  %s" % (width, name, "  ".join("%10s" % fmt.format(get(runs[k])) for k in kinds)))
    if "vmem" in runs:
        lines += [""] + format_ratios(result)
    return "\n".join(lines)


def ratios(result: dict) -> dict:
    """{baseline: {metric: vmem / baseline}} for every other cache kind in the run."""
    runs = result["runs"]
    v = runs["vmem"]
    out = {}
    for kind, r in runs.items():
        if kind == "vmem":
            continue
        def div(a, b):
            return a / b if b else math.inf
        out[kind] = {"output_throughput": div(v["metrics"]["output_throughput"], r["metrics"]["output_throughput"]),
                     "mean_running": div(v["mean_running"], r["mean_running"]),
                     "ttft_p50": div(v["metrics"]["ttft_ms"]["p50"], r["metrics"]["ttft_ms"]["p50"]),
                     "ttft_p99": div(v["metrics"]["ttft_ms"]["p99"], r["metrics"]["ttft_ms"]["p99"])}
    return out


def format_ratios(result: dict) -> list[str]:
    return ["vmem vs %-6s  %.2fx output tok/s, %.2fx requests running at once, TTFT p50 %.2fx, p99 %.2fx"
            % (kind, q["output_throughput"], q["mean_running"], q["ttft_p50"], q["ttft_p99"])
            for kind, q in ratios(result).items()]


def plot(result: dict, path: str | Path) -> Path:
    """PNG: physical KV memory (top) and running requests (bottom) over time, one line per cache."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_mem, ax_run) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for kind, run in result["runs"].items():
        tl = run["timeline"]
        line, = ax_mem.step(tl["t_s"], np.asarray(tl["physical_kv_bytes"]) / 2**20, where="post",
                            label="%s physical" % kind)
        ax_mem.step(tl["t_s"], np.asarray(tl["used_kv_bytes"]) / 2**20, where="post", linestyle=":",
                    color=line.get_color(), label="%s used by live requests" % kind)
        ax_run.step(tl["t_s"], tl["running"], where="post", label=kind, color=line.get_color())
    w = result["workload"]
    arrivals = result["config"].get("arrivals", "paced")
    how = ("all waiting at t = 0" if arrivals == "burst" else "%.2f req/s" % w.get("rate_per_s", math.nan))
    ax_mem.set_title("replay: %d requests, %s, %.2f MiB of KV for every cache"
                     % (w["num_requests"], how, result["memory_bytes"] / 2**20))
    ax_mem.set_ylabel("KV memory (MiB)")
    ax_run.set_ylabel("running requests")
    ax_run.set_xlabel("wall time (s)")
    ax_mem.set_ylim(0, ax_mem.get_ylim()[1] * 1.3)       # room for the legend above the lines
    ax_mem.legend(fontsize=7, ncol=3, loc="upper center")
    ax_run.legend(fontsize=8)
    ax_mem.grid(alpha=0.3)
    ax_run.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(result), indent=1, default=str))
    return path


def _finite(value):
    """Strict JSON: non-finite floats (a burst's rate) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class _Progress:
    """tqdm on stderr when available, else one updating stderr line."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled, self.n = total, label, enabled, 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, leave=True, mininterval=1.0)
            except ImportError:
                pass

    def update(self) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update()
        elif self.enabled:
            sys.stderr.write("\r%s: %d/%d requests" % (self.label, self.n, self.total))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")
