"""The engine thread behind the HTTP server, and the server's Prometheus metrics.

Engine methods are not thread-safe, so one background thread owns the engine: it drains a
thread-safe inbox of adds and aborts, runs ``engine.step()``, and hands each ``RequestOutput`` to
the sink the request was submitted with. All outputs of one step cross to the consumer in one hop
(``post``, the server's ``loop.call_soon_threadsafe``), not one wake-up per request. Everything
else reads snapshots the thread publishes.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Any, Callable

from vmem.engine.metrics import tpot_s

logger = logging.getLogger(__name__)


class ShuttingDown(RuntimeError):
    """What requests still in flight receive when the engine loop stops."""


Sink = Callable[[Any], None]   # receives a RequestOutput, or an exception if the request failed
Post = Callable[..., Any]      # post(fn, *args): run fn(*args) on the consumer's thread


class EngineLoop:
    """Runs ``engine`` on one background thread.

    ``submit(request, sink)`` and ``abort(request_id)`` may be called from any thread; both
    return at once. ``sink`` gets every ``RequestOutput`` of the request, or once an exception
    (``VmemInvalidArgument`` from ``add_request``, or whatever broke a step); after a finished
    output, an exception or an abort it is never called again. Sinks run through ``post`` (on the
    consumer's thread), or on the engine thread when ``post`` is None.
    """

    def __init__(self, engine, *, post: Post | None = None, stats_interval_s: float = 0.05,
                 idle_wait_s: float = 0.5):
        self.engine = engine
        self._post = post
        self._outbox: list[tuple[Sink, Any]] = []   # engine thread only; flushed once per iteration
        self._stats_interval_s = stats_interval_s
        self._idle_wait_s = idle_wait_s
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._inbox: deque = deque()          # ("add", request, sink) | ("abort", request_id)
        self._num_inbox_adds = 0
        self._accepting = True                # False once the thread has drained its inbox for good
        self._sinks: dict[str, Sink] = {}     # engine thread only
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None   # set if the loop itself died
        # Snapshots published by the engine thread (plain attribute stores; readers never block it).
        self.num_running = 0
        self.num_waiting = 0
        self.num_steps = 0
        self.stats: dict = {}

    # -- any thread ------------------------------------------------------------------------------
    def start(self) -> None:
        self._refresh_stats()
        self._thread = threading.Thread(target=self._run, name="vmem-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Abort everything still in flight and join the thread. Returns False if it is still inside a
        step after ``timeout_s``: then the engine is still its thread's, and must not be closed."""
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        return not self.thread_alive

    @property
    def thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self.thread_alive and self.error is None

    @property
    def num_queued(self) -> int:
        """Requests not yet running: waiting in the engine plus not yet handed to it."""
        return self.num_waiting + self._num_inbox_adds

    def submit(self, request, sink: Sink) -> None:
        with self._lock:
            accepted = self._accepting
            if accepted:
                self._inbox.append(("add", request, sink))
                self._num_inbox_adds += 1
        if not accepted:   # the thread has stopped: answer now, on the caller's thread
            sink(ShuttingDown("the engine loop is not running"))
            return
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wakeup.set()

    # -- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        last_stats, busy = 0.0, False
        try:
            while not self._stop.is_set():
                self._drain()
                if self.engine.has_work():
                    busy = True
                    self._step()
                    self._flush()
                    now = time.monotonic()
                    if now - last_stats >= self._stats_interval_s:
                        self._refresh_stats()
                        last_stats = now
                    continue
                self._flush()
                if busy:   # just went idle: the cheap moment to check the allocator's invariants
                    busy, last_stats = False, 0.0   # and the first busy step refreshes the stats
                    self.engine.cache.check_integrity()
                self.engine.maintain()   # an elastic cache gives idle pages back to its shared budget
                self._refresh_stats()
                elastic = getattr(self.engine.cache, "lease", None) is not None
                self._wakeup.wait(min(self._idle_wait_s, 0.1) if elastic else self._idle_wait_s)
                self._wakeup.clear()
        except BaseException as exc:  # the loop must report, not vanish
            logger.exception("engine loop died")
            self.error = exc
            self._fail_all(exc)
        finally:
            self._shutdown()
            self._flush()

    def _drain(self) -> None:
        with self._lock:
            ops = list(self._inbox)
            self._inbox.clear()
            self._wakeup.clear()
        num_adds = 0
        for op in ops:
            if op[0] == "add":
                _, request, sink = op
                num_adds += 1
                try:
                    self.engine.add_request(request)
                except Exception as exc:   # VmemInvalidArgument: the prompt can never fit
                    self._outbox.append((sink, exc))
                    continue
                self._sinks[request.request_id] = sink
            else:
                if self._sinks.pop(op[1], None) is not None:
                    self.engine.abort(op[1])
        # Publish the engine's queue before un-counting the inbox: num_queued may briefly
        # count a request twice, never zero times.
        self.num_waiting = self.engine.num_waiting
        with self._lock:
            self._num_inbox_adds -= num_adds

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            # A step that raises leaves no request we can vouch for: fail them all, keep serving.
            logger.exception("engine step failed; failing %d requests", len(self._sinks))
            self._fail_all(exc)
            return
        self.num_steps += 1
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if out.finished:
                del self._sinks[out.request_id]
            self._outbox.append((sink, out))
        self.num_running = self.engine.num_running
        self.num_waiting = self.engine.num_waiting

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, sink in list(self._sinks.items()):
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("abort of %s failed", request_id)
            self._outbox.append((sink, exc))
        self._sinks.clear()

    def _shutdown(self) -> None:
        with self._lock:
            self._accepting = False
            ops = list(self._inbox)
            self._inbox.clear()
            self._num_inbox_adds = 0
        for op in ops:
            if op[0] == "add":
                self._outbox.append((op[2], ShuttingDown("server is shutting down")))
        for request_id, sink in list(self._sinks.items()):
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("abort of %s failed", request_id)
            self._outbox.append((sink, ShuttingDown("server is shutting down")))
        self._sinks.clear()
        self._refresh_stats()

    def _flush(self) -> None:
        """Hand this iteration's outputs to the consumer in one hop."""
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        if self._post is None:
            _fan_out(batch)
            return
        try:
            self._post(_fan_out, batch)
        except RuntimeError:   # the consumer's event loop is closed: nobody is listening any more
            logger.debug("dropped %d outputs for a closed loop", len(batch))

    def _refresh_stats(self) -> None:
        try:
            stats = dict(self.engine.stats())
        except Exception:
            logger.exception("engine.stats() failed")
            return
        self.num_running = self.engine.num_running
        self.num_waiting = self.engine.num_waiting
        self.stats = stats


def _fan_out(batch: list[tuple[Sink, Any]]) -> None:
    for sink, item in batch:
        try:
            sink(item)
        except Exception:
            logger.exception("a request's sink failed")


# ---------------------------------------------------------------------------------------------
# Prometheus metrics

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    """A cumulative Prometheus histogram (seconds)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS_S):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)   # last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, help_: str) -> list[str]:
        lines = ["# HELP %s %s" % (name, help_), "# TYPE %s histogram" % name]
        cumulative = 0
        for bound, n in zip(self.buckets + (math.inf,), self.counts):
            cumulative += n
            le = "+Inf" if bound == math.inf else repr(float(bound))
            lines.append('%s_bucket{le="%s"} %d' % (name, le, cumulative))
        lines.append("%s_sum %r" % (name, float(self.sum)))
        lines.append("%s_count %d" % (name, self.count))
        return lines


_KV_STATES = ("total", "used", "mapped", "reclaimable", "free")   # CacheStats: <state>_pages, <state>_bytes


def _find(stats: dict, key: str):
    value = stats.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class ServerMetrics:
    """Counters and histograms kept by the server (touched only on the asyncio loop)."""

    def __init__(self):
        self.finished: dict[str, int] = {}
        self.rejected: dict[int, int] = {}
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0
        self.ttft = Histogram()
        self.e2e = Histogram()
        self.tpot = Histogram(TPOT_BUCKETS_S)

    def on_finish(self, reason: str, num_prompt_tokens: int, num_output_tokens: int,
                  ttft_s: float | None, e2e_s: float) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1
        self.num_prompt_tokens += num_prompt_tokens
        self.num_output_tokens += num_output_tokens
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            tpot = tpot_s(e2e_s, ttft_s, num_output_tokens)
            if tpot is not None:
                self.tpot.observe(tpot)
        self.e2e.observe(e2e_s)

    def on_reject(self, status_code: int) -> None:
        self.rejected[status_code] = self.rejected.get(status_code, 0) + 1

    def render(self, loop: EngineLoop) -> str:
        stats = loop.stats
        out: list[str] = []

        def gauge(name, help_, samples, kind="gauge"):
            samples = [(labels, v) for labels, v in samples if v is not None]
            if not samples:
                return
            out.append("# HELP %s %s" % (name, help_))
            out.append("# TYPE %s %s" % (name, kind))
            for labels, value in samples:
                label_s = "{%s}" % ",".join('%s="%s"' % kv for kv in labels) if labels else ""
                out.append("%s%s %s" % (name, label_s, _num(value)))

        for unit in ("pages", "bytes"):
            gauge("vmem_kv_%s" % unit, "KV cache %s by state" % unit,
                  [((("state", s),), _find(stats, "%s_%s" % (s, unit))) for s in _KV_STATES])
        if _find(stats, "budget_limit_pages"):      # a KV budget shared with other servers
            gauge("vmem_kv_budget_held_pages", "KV pages this server holds of the shared budget",
                  [((), _find(stats, "budget_held_pages"))])
            gauge("vmem_kv_budget_total_held_pages", "KV pages every tenant of the shared budget holds",
                  [((), _find(stats, "budget_total_held_pages"))])
            gauge("vmem_kv_budget_limit_pages", "The shared KV budget's total, in this server's pages",
                  [((), _find(stats, "budget_limit_pages"))])
            gauge("vmem_kv_budget_waiting_pages", "KV pages this server waits for (refused by the budget)",
                  [((), _find(stats, "budget_waiting_pages"))])
        gauge("vmem_requests_running", "Requests running in the engine", [((), loop.num_running)])
        gauge("vmem_requests_waiting", "Requests queued, not yet running", [((), loop.num_queued)])
        gauge("vmem_preemptions_total", "Requests preempted (recomputed) by the engine",
              [((), _find(stats, "num_preemptions"))], "counter")
        # vLLM's names: prompt tokens looked up in the prefix cache, and those found (hit rate = hits / queries)
        gauge("vllm:prefix_cache_queries_total", "Prefix cache queries, in queried tokens",
              [((), _find(stats, "prefix_cache_queries"))], "counter")
        gauge("vllm:prefix_cache_hits_total", "Prefix cache hits, in cached tokens",
              [((), _find(stats, "prefix_cache_hits"))], "counter")
        gauge("vmem_engine_steps_total", "Engine steps run", [((), loop.num_steps)], "counter")
        gauge("vmem_engine_up", "1 while the engine thread runs", [((), int(loop.alive))])
        gauge("vmem_requests_finished_total", "Requests finished, by reason",
              [((("reason", r),), n) for r, n in sorted(self.finished.items())], "counter")
        gauge("vmem_requests_rejected_total", "Requests refused, by HTTP status",
              [((("status", str(c)),), n) for c, n in sorted(self.rejected.items())], "counter")
        gauge("vmem_prompt_tokens_total", "Prompt tokens of finished requests",
              [((), self.num_prompt_tokens)], "counter")
        gauge("vmem_generation_tokens_total", "Output tokens of finished requests",
              [((), self.num_output_tokens)], "counter")
        out += self.ttft.render("vmem_time_to_first_token_seconds", "Time to first token")
        out += self.e2e.render("vmem_e2e_request_latency_seconds", "End-to-end request latency")
        out += self.tpot.render("vmem_time_per_output_token_seconds", "Time per output token after the first")
        # Everything else the engine reports, as untyped gauges, so nothing is hidden.
        for key in sorted(stats):
            value = stats[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append("vmem_engine_stat{key=\"%s\"} %s" % (key, _num(value)))
        return "\n".join(out) + "\n"


def _num(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(int(value))
