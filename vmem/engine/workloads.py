"""Workloads: real trace loaders (Azure LLM inference 2023, BurstGPT, Mooncake) and seeded generators.

A workload is a list of `TraceRequest(arrival_s, prompt_tokens, output_tokens)` sorted by arrival,
with arrivals in seconds from the first request. `output_tokens == 0` marks a failed request
(BurstGPT's convention); replay skips those and counts them.

Generator (see docs/structure.md and the notes on BurstGPT / Sarathi / `vllm bench serve`):
  inter-arrival ~ Gamma(shape k = 1/CV^2, scale = 1/(rate*k))   k < 1 bursty, k = 1 Poisson
  lengths       ~ bounded discrete Zipf on [min, max], or an empirical sample (inverse CDF)
Scaling knobs (`scale_trace`) keep a trace's shape while fitting it to a small CPU model:
  time_scale multiplies timestamps (0.5 = twice the rate), length_scale multiplies lengths,
  then lengths are clipped to [1, max_*_tokens].

Workloads with shared prefixes carry token ids: `TokenRequest(arrival_s, prompt_ids, output_tokens)`.
  Mooncake (FAST'25, `load_mooncake` + `mooncake_requests`): each record names its prompt's 512-token
  blocks by `hash_ids`; equal ids become equal token blocks (drawn from a generator seeded by the id),
  and `scale` shrinks lengths *and* the block together (1/32: 16-token blocks), so the sharing
  structure survives on a small model. `generate_sessions`: multi-turn conversations over a few shared
  system prompts; turn t's prompt is the system prompt, the earlier turns (user + reply) and a new
  user message.
"""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from vmem.errors import VmemInvalidArgument

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
AZURE_CONV_CSV = DATA_DIR / "azure_llm_inference_2023" / "AzureLLMInferenceTrace_conv.csv"
MOONCAKE_CONV_JSONL = DATA_DIR / "mooncake_fast25" / "conversation_trace.jsonl"
MOONCAKE_BLOCK_TOKENS = 512
BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")


class TraceRequest(NamedTuple):
    arrival_s: float      # seconds from the first request of the trace
    prompt_tokens: int
    output_tokens: int    # 0 = the request failed in the original system


class TokenRequest(NamedTuple):
    arrival_s: float            # seconds from the first request
    prompt_ids: tuple[int, ...]
    output_tokens: int


class MooncakeRecord(NamedTuple):
    arrival_s: float            # `timestamp` (ms) / 1000, from the first record
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...]   # one per 512-token prompt block; equal ids = equal blocks


# ---------------------------------------------------------------- loaders

def load_trace(path: str | Path | None = None, **kwargs) -> list[TraceRequest]:
    """Load an Azure or BurstGPT CSV, recognised by its header; None = the bundled Azure conv trace."""
    path = Path(path) if path is not None else AZURE_CONV_CSV
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    except OSError as e:
        raise VmemInvalidArgument(f"cannot read trace {path}: {e}") from e
    header = [h.strip() for h in header]
    if "ContextTokens" in header:
        return load_azure_csv(path, **kwargs)
    if "Request tokens" in header:
        return load_burstgpt_csv(path, **kwargs)
    raise VmemInvalidArgument(f"{path}: unknown trace format (header {header!r}); "
                              "expected Azure (TIMESTAMP,ContextTokens,GeneratedTokens) or BurstGPT")


def _parse_azure_time(text: str) -> float:
    # '2023-11-16 18:15:46.6805900': 7 fractional digits, more than strptime's %f takes.
    head, _, frac = text.strip().partition(".")
    t = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
    return t + (float("0." + frac) if frac else 0.0)


def load_azure_csv(path: str | Path | None = None) -> list[TraceRequest]:
    """Azure LLM inference trace (TIMESTAMP, ContextTokens, GeneratedTokens), arrivals from 0."""
    path = Path(path) if path is not None else AZURE_CONV_CSV
    rows = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            try:
                rows.append((_parse_azure_time(row["TIMESTAMP"]), int(row["ContextTokens"]),
                             int(row["GeneratedTokens"])))
            except (KeyError, ValueError, TypeError) as e:
                raise VmemInvalidArgument(f"{path}:{i + 2}: bad Azure trace row {row!r}: {e}") from e
    return _normalise(rows)


def load_burstgpt_csv(path: str | Path, *, model: str | None = None,
                      include_failures: bool = False) -> list[TraceRequest]:
    """BurstGPT CSV (Timestamp, Model, Request tokens, Response tokens, ...), arrivals from 0.

    model: keep only rows of this `Model` ("ChatGPT", "GPT-4"); include_failures: keep rows with
    `Response tokens == 0` (failed requests) instead of dropping them.
    """
    rows = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            try:
                if model is not None and row.get("Model") != model:
                    continue
                out = int(float(row["Response tokens"]))
                if out == 0 and not include_failures:
                    continue
                rows.append((float(row["Timestamp"]), int(float(row["Request tokens"])), out))
            except (KeyError, ValueError, TypeError) as e:
                raise VmemInvalidArgument(f"{path}:{i + 2}: bad BurstGPT row {row!r}: {e}") from e
    return _normalise(rows)


def _normalise(rows: list[tuple[float, int, int]]) -> list[TraceRequest]:
    rows.sort(key=lambda r: r[0])
    if not rows:
        return []
    t0 = rows[0][0]
    return [TraceRequest(t - t0, max(p, 0), max(o, 0)) for t, p, o in rows]


def write_burstgpt_csv(requests: Sequence[TraceRequest], path: str | Path, *, model: str = "synthetic") -> None:
    """Write a workload as a BurstGPT-compatible CSV, so the same loader replays real and synthetic traces."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(BURSTGPT_COLUMNS)
        for r in requests:
            w.writerow([f"{r.arrival_s:.6f}", model, r.prompt_tokens, r.output_tokens,
                        r.prompt_tokens + r.output_tokens, "Conversation log"])


def load_mooncake(path: str | Path | None = None) -> list[MooncakeRecord]:
    """Mooncake trace JSONL (`timestamp` ms, `input_length`, `output_length`, `hash_ids`), sorted by
    arrival, arrivals from 0; None = the bundled conversation trace (Apache-2.0, see its README)."""
    path = Path(path) if path is not None else MOONCAKE_CONV_JSONL
    rows = []
    try:
        with open(path) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    rec = (float(r["timestamp"]) / 1000.0, int(r["input_length"]), int(r["output_length"]),
                           tuple(int(h) for h in r["hash_ids"]))
                except (KeyError, ValueError, TypeError) as e:
                    raise VmemInvalidArgument(f"{path}:{i + 1}: bad Mooncake record: {e}") from e
                if rec[1] < 0 or rec[2] < 0 or len(rec[3]) < -(-rec[1] // MOONCAKE_BLOCK_TOKENS):
                    raise VmemInvalidArgument(f"{path}:{i + 1}: lengths must be >= 0 and hash_ids must name "
                                              f"every {MOONCAKE_BLOCK_TOKENS}-token block of the input")
                rows.append(rec)
    except OSError as e:
        raise VmemInvalidArgument(f"cannot read trace {path}: {e}") from e
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0] if rows else 0.0
    return [MooncakeRecord(t - t0, n, o, h) for t, n, o, h in rows]


def mooncake_requests(records: Sequence[MooncakeRecord], *, scale: float = 1 / 32, vocab_size: int = 256,
                      seed: int = 0, time_scale: float = 1.0, max_prompt_tokens: int | None = None,
                      max_output_tokens: int | None = None) -> list[TokenRequest]:
    """Token-level requests from Mooncake records, sharing structure kept.

    A block of ``block = round(512 * scale)`` tokens stands for each hash id; its tokens are drawn from
    a generator seeded by (seed, hash id), so equal ids give equal blocks in every request. Prompt
    length ``round(input * scale)`` (>= 1): its blocks in order, the last one cut short. Prompts longer
    than ``max_prompt_tokens`` keep their first tokens (a shared prefix stays shared). Output
    ``round(output * scale)`` clipped to [1, max_output_tokens]. Arrivals *= time_scale.
    """
    if not 0 < scale <= 1 or time_scale <= 0:
        raise VmemInvalidArgument(f"need 0 < scale <= 1 and time_scale > 0, got {scale}, {time_scale}")
    block = max(1, round(MOONCAKE_BLOCK_TOKENS * scale))
    blocks: dict[int, list[int]] = {}

    def tokens_of(h: int) -> list[int]:
        if h not in blocks:
            blocks[h] = np.random.default_rng([seed, h]).integers(0, vocab_size, size=block).tolist()
        return blocks[h]

    out = []
    for r in records:
        n = _clip(round(r.input_tokens * scale), max_prompt_tokens)
        ids: list[int] = []
        for h in r.hash_ids[:-(-n // block)]:
            ids.extend(tokens_of(h))
        out.append(TokenRequest(r.arrival_s * time_scale, tuple(ids[:n]),
                                _clip(round(r.output_tokens * scale), max_output_tokens)))
    return out


def prefix_reuse(requests: Sequence[TokenRequest], block_tokens: int) -> float:
    """Share of prompt tokens in full blocks that repeat a leading prefix seen earlier (an unbounded
    cache's hit rate at this block size, all but each prompt's last token eligible)."""
    root: dict = {}
    hit = total = 0
    for r in requests:
        ids, node, matching = r.prompt_ids, root, True
        total += len(ids)
        for i in range(len(ids) // block_tokens):
            key = tuple(ids[i * block_tokens:(i + 1) * block_tokens])
            if matching and key in node and (i + 1) * block_tokens < len(ids):
                hit += block_tokens
            else:
                matching = False
            node = node.setdefault(key, {})
    return hit / total if total else 0.0


# ---------------------------------------------------------------- scaling

def scale_trace(requests: Sequence[TraceRequest], *, start_s: float = 0.0, duration_s: float | None = None,
                max_requests: int | None = None, time_scale: float = 1.0, rate: float | None = None,
                length_scale: float = 1.0, output_scale: float | None = None,
                max_prompt_tokens: int | None = None, max_output_tokens: int | None = None,
                ) -> list[TraceRequest]:
    """Cut a window of a trace and scale it to the machine, keeping its shape.

    Window: requests with start_s <= arrival < start_s + duration_s (original seconds), at most
    max_requests, re-based to 0. Time: arrivals *= time_scale, or, when `rate` is given, scaled so the
    window's mean rate is `rate` req/s. Lengths: prompt *= length_scale, output *= output_scale
    (default length_scale), rounded, clipped to [1, max_*]; a failed request (output 0) stays 0.
    """
    if time_scale <= 0 or length_scale <= 0 or (output_scale is not None and output_scale <= 0):
        raise VmemInvalidArgument("time_scale, length_scale and output_scale must be > 0")
    if rate is not None and rate <= 0:
        raise VmemInvalidArgument(f"rate must be > 0 req/s, got {rate}")
    end_s = math.inf if duration_s is None else start_s + duration_s
    window = [r for r in requests if start_s <= r.arrival_s < end_s]
    if max_requests is not None:
        window = window[:max_requests]
    if not window:
        return []
    t0 = window[0].arrival_s
    span_s = window[-1].arrival_s - t0
    if rate is not None and len(window) > 1 and span_s > 0:
        time_scale = (len(window) - 1) / (rate * span_s)
    out_scale = length_scale if output_scale is None else output_scale
    return [TraceRequest((r.arrival_s - t0) * time_scale,
                         _clip(round(r.prompt_tokens * length_scale), max_prompt_tokens),
                         0 if r.output_tokens == 0 else _clip(round(r.output_tokens * out_scale), max_output_tokens))
            for r in window]


def _clip(n: int, hi: int | None) -> int:
    n = max(int(n), 1)
    return n if hi is None else min(n, hi)


# ---------------------------------------------------------------- generator

class ZipfLengths(NamedTuple):
    """Bounded discrete Zipf on [min_tokens, max_tokens]: P(n) proportional to n^-a."""
    a: float
    min_tokens: int
    max_tokens: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if not (1 <= self.min_tokens <= self.max_tokens) or self.a < 0:
            raise VmemInvalidArgument(f"bad Zipf lengths {self}")
        support = np.arange(self.min_tokens, self.max_tokens + 1)
        p = support.astype(np.float64) ** -self.a
        return rng.choice(support, size=n, p=p / p.sum())


class EmpiricalLengths(NamedTuple):
    """Inverse-CDF sampling from observed lengths (e.g. a real trace's column)."""
    values: tuple[int, ...]

    @classmethod
    def from_trace(cls, requests: Sequence[TraceRequest], column: str = "prompt_tokens") -> "EmpiricalLengths":
        return cls(tuple(int(getattr(r, column)) for r in requests if getattr(r, column) > 0))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if not self.values:
            raise VmemInvalidArgument("empirical length distribution has no values")
        sorted_values = np.sort(np.asarray(self.values))
        u = rng.random(n)
        return sorted_values[np.minimum((u * len(sorted_values)).astype(np.int64), len(sorted_values) - 1)]


def gamma_arrivals(rng: np.random.Generator, num_requests: int, rate: float, cv: float) -> np.ndarray:
    """Arrival times [num_requests] float64 s, first at 0: Gamma renewal, shape 1/cv^2, mean gap 1/rate."""
    if rate <= 0 or cv <= 0:
        raise VmemInvalidArgument(f"rate and cv must be > 0, got rate={rate} cv={cv}")
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=max(num_requests - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])


def generate(num_requests: int, *, rate: float = 1.0, cv: float = 1.0,
             prompt_lengths: ZipfLengths | EmpiricalLengths = ZipfLengths(1.1, 16, 1024),
             output_lengths: ZipfLengths | EmpiricalLengths = ZipfLengths(1.1, 16, 512),
             failure_fraction: float = 0.0, seed: int = 0) -> list[TraceRequest]:
    """A seeded synthetic workload: Gamma arrivals at `rate` req/s with inter-arrival CV `cv`,
    independent prompt/output lengths, a `failure_fraction` of requests with output 0."""
    if num_requests < 0:
        raise VmemInvalidArgument(f"num_requests must be >= 0, got {num_requests}")
    if not 0.0 <= failure_fraction <= 1.0:
        raise VmemInvalidArgument(f"failure_fraction must be in [0, 1], got {failure_fraction}")
    rng = np.random.default_rng(seed)
    arrivals = gamma_arrivals(rng, num_requests, rate, cv)
    prompts = prompt_lengths.sample(rng, num_requests)
    outputs = output_lengths.sample(rng, num_requests)
    failed = rng.random(num_requests) < failure_fraction
    return [TraceRequest(float(t), int(p), 0 if f else int(o))
            for t, p, o, f in zip(arrivals, prompts, outputs, failed)]


def generate_sessions(num_sessions: int, *, rate: float = 1.0, cv: float = 1.0, num_system_prompts: int = 4,
                      system_prompt_tokens: int = 256, turns: ZipfLengths = ZipfLengths(1.0, 1, 6),
                      user_lengths: ZipfLengths = ZipfLengths(1.1, 8, 128),
                      output_lengths: ZipfLengths = ZipfLengths(1.1, 8, 128), think_time_s: float = 5.0,
                      vocab_size: int = 256, seed: int = 0) -> list[TokenRequest]:
    """Multi-turn sessions over shared system prompts, sorted by arrival.

    Sessions start at Gamma arrivals (`rate`, `cv`) and pick one of `num_system_prompts` prompts of
    `system_prompt_tokens` tokens (Zipf popularity, a = 1). Turn t's prompt = system prompt + every
    earlier turn's user message and reply + a new user message, so each turn extends the last one's
    prompt; turns are `think_time_s` apart (exponential). Replies are synthetic tokens of the sampled
    output length, standing for what the model said.
    """
    if num_sessions < 0 or num_system_prompts < 1 or system_prompt_tokens < 0 or think_time_s < 0:
        raise VmemInvalidArgument("need num_sessions >= 0, num_system_prompts >= 1, system_prompt_tokens >= 0 "
                                  "and think_time_s >= 0")
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, vocab_size, size=system_prompt_tokens).tolist() for _ in range(num_system_prompts)]
    popularity = np.arange(1, num_system_prompts + 1, dtype=np.float64) ** -1.0
    starts = gamma_arrivals(rng, num_sessions, rate, cv)
    out = []
    for start in starts:
        history = list(systems[int(rng.choice(num_system_prompts, p=popularity / popularity.sum()))])
        t = float(start)
        for _ in range(int(turns.sample(rng, 1)[0])):
            history += rng.integers(0, vocab_size, size=int(user_lengths.sample(rng, 1)[0])).tolist()
            num_out = int(output_lengths.sample(rng, 1)[0])
            out.append(TokenRequest(t, tuple(history), num_out))
            history += rng.integers(0, vocab_size, size=num_out).tolist()
            t += float(rng.exponential(think_time_s)) if think_time_s else 0.0
    out.sort(key=lambda r: r.arrival_s)
    return out


def summarize(requests: Sequence[TraceRequest]) -> dict:
    """Rate, inter-arrival CV and length percentiles of a workload (for reports and tests)."""
    if not requests:
        return {"num_requests": 0}
    t = np.array([r.arrival_s for r in requests])
    gaps = np.diff(t)
    p = np.array([r.prompt_tokens for r in requests])
    o = np.array([r.output_tokens for r in requests])
    span_s = float(t[-1] - t[0])
    pct = lambda x: {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)),
                     "p90": float(np.percentile(x, 90)), "p99": float(np.percentile(x, 99)), "max": int(x.max())}
    return {
        "num_requests": len(requests),
        "span_s": span_s,
        "rate_per_s": (len(requests) - 1) / span_s if span_s > 0 else math.inf,
        "interarrival_cv": float(gaps.std() / gaps.mean()) if len(gaps) > 1 and gaps.mean() > 0 else 0.0,
        "failure_fraction": float((o == 0).mean()),
        "prompt_tokens": pct(p),
        "output_tokens": pct(o),
    }


def prompt_ids(num_tokens: int, rng: np.random.Generator, vocab_size: int = 256) -> list[int]:
    """Synthetic prompt token ids [num_tokens] in [0, vocab_size): the traces carry lengths, not text."""
    return rng.integers(0, vocab_size, size=num_tokens).tolist()
