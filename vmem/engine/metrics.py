"""Serving metrics as `vllm bench serve` defines them, from per-request wall-clock records.

Per request (all times in seconds on one monotonic clock):
  TTFT = first token time - arrival (send) time
  ITL  = gaps between successive output tokens
  E2EL = last token time - arrival time
  TPOT = (E2EL - TTFT) / (output_tokens - 1); only requests with more than one output token
Aggregate: request and output-token throughput over the run's duration, concurrency = sum(E2EL) /
duration, goodput = requests meeting every given SLO (DistServe definition) / duration.
Latency summaries are in milliseconds: mean, median, std and the requested percentiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

DEFAULT_PERCENTILES = (50, 90, 99)


def tpot_s(e2el_s: float, ttft_s: float, num_output_tokens: int) -> float | None:
    """vllm bench serve's TPOT: decode time per output token after the first; None below two tokens.
    The one definition: replay metrics and the server's histogram both call it."""
    if num_output_tokens < 2:
        return None
    return (e2el_s - ttft_s) / (num_output_tokens - 1)


@dataclass
class RequestRecord:
    """One request's timeline as a client sees it."""
    request_id: str
    arrival_time: float                       # when it was sent (monotonic seconds)
    num_prompt_tokens: int
    token_times: list[float] = field(default_factory=list)   # one entry per output token
    finish_reason: str | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def e2el(self) -> float | None:
        return self.token_times[-1] - self.arrival_time if self.token_times else None

    @property
    def tpot(self) -> float | None:
        if not self.token_times:
            return None
        return tpot_s(self.e2el, self.ttft, len(self.token_times))

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def summarize_ms(values_s: Sequence[float], percentiles: Iterable[float] = DEFAULT_PERCENTILES) -> dict:
    """{mean, median, std, p<q>...} in ms of a list of seconds; zeros when empty (as vLLM reports)."""
    x = np.asarray(values_s, dtype=np.float64) * 1000.0
    if x.size == 0:
        x = np.zeros(1)
    out = {"mean": float(x.mean()), "median": float(np.median(x)), "std": float(x.std())}
    for q in percentiles:
        out[f"p{q:g}"] = float(np.percentile(x, q))
    return out


def compute_metrics(records: Sequence[RequestRecord], duration_s: float, *,
                    slos_ms: Mapping[str, float] | None = None,
                    percentiles: Iterable[float] = DEFAULT_PERCENTILES) -> dict:
    """Aggregate metrics of a run.

    records: every request sent; those without a finish_reason or with "error"/"abort" count as failed.
    duration_s: wall time of the run (first send to last token).
    slos_ms: e.g. {"ttft": 2000, "tpot": 100, "e2el": 10000}; goodput counts requests meeting all of them.
    """
    percentiles = tuple(percentiles)
    done = [r for r in records if r.finish_reason in ("length", "stop") and r.token_times]
    ttfts = [r.ttft for r in done]
    tpots = [r.tpot for r in done if r.tpot is not None]
    itls = [g for r in done for g in r.itls]
    e2els = [r.e2el for r in done]
    num_output = sum(r.num_output_tokens for r in done)
    num_input = sum(r.num_prompt_tokens for r in done)
    duration_s = max(duration_s, 1e-9)
    out = {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": num_input,
        "total_output_tokens": num_output,
        "request_throughput": len(done) / duration_s,
        "output_throughput": num_output / duration_s,
        "total_token_throughput": (num_input + num_output) / duration_s,
        "concurrency": sum(e2els) / duration_s,
        "ttft_ms": summarize_ms(ttfts, percentiles),
        "tpot_ms": summarize_ms(tpots, percentiles),
        "itl_ms": summarize_ms(itls, percentiles),
        "e2el_ms": summarize_ms(e2els, percentiles),
    }
    if slos_ms:
        unknown = set(slos_ms) - {"ttft", "tpot", "e2el"}
        if unknown:
            from vmem.errors import VmemInvalidArgument
            raise VmemInvalidArgument(f"unknown SLO metric(s) {sorted(unknown)}; use ttft, tpot, e2el")
        good = sum(1 for r in done if _meets(r, slos_ms))
        out["goodput"] = good / duration_s
        out["slos_ms"] = dict(slos_ms)
    return out


def _meets(r: RequestRecord, slos_ms: Mapping[str, float]) -> bool:
    for name, limit_ms in slos_ms.items():
        value = getattr(r, name)
        # A one-token request has no TPOT: it meets a TPOT SLO trivially, as in vLLM.
        if value is not None and value * 1000.0 > limit_ms:
            return False
    return True
