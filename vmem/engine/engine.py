"""The reference engine: a scheduler, a model and a KV cache manager, one `step()` at a time.

    engine = build_engine("tiny", "vmem", memory_bytes=64 << 20)
    engine.add_request(Request("r0", engine.tokenizer.encode("hello"), SamplingParams(max_tokens=8)))
    while engine.has_work():
        for out in engine.step(): ...

One step:
  1. schedule (admit / chunk / preempt, see scheduler.py), giving needs {slot: tokens to map};
  2. cache.step(needs): make them writable in one native call (waits only for a prefetch in flight);
  3. cache.prefetch(needs of step t+1 as far as known) so the mapping worker runs during the forward;
  4. one forward per group of sequences fed the same number of tokens (all decodes share one);
  5. sample where a sequence reached the end of its tokens; finish on length / EOS / stop string.
Engine methods are not thread-safe: a server drives one engine from one thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import numbers
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from vmem.engine.scheduler import Scheduler, SeqStatus, Sequence
from vmem.errors import VmemInvalidArgument, VmemOutOfMemory

logger = logging.getLogger(__name__)

# A step that only waits for other tenants of a shared KV budget sleeps this long (no busy loop).
BUDGET_POLL_S = 0.002
# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): logits / T would overflow to inf.
SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0          # below SAMPLING_EPS (e.g. 0) = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool = False

    def check(self) -> None:
        """Raise VmemInvalidArgument unless every field is one the engine can run (a NaN or a
        non-integer here would otherwise fail a later step, and with it every request in flight)."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise VmemInvalidArgument(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise VmemInvalidArgument(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise VmemInvalidArgument(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(1 << 63) <= self.seed < (1 << 64)):
            raise VmemInvalidArgument(f"seed must be None or an integer in [-2**63, 2**64), got {self.seed!r}")
        if self.stop is not None and (isinstance(self.stop, str) or not isinstance(self.stop, (list, tuple))
                                      or not all(isinstance(s, str) and s for s in self.stop)):
            raise VmemInvalidArgument(f"stop must be None or a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.ignore_eos, bool):
            raise VmemInvalidArgument(f"ignore_eos must be a bool, got {self.ignore_eos!r}")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.monotonic)


class RequestOutput(NamedTuple):
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None         # "length" | "stop" | "abort" | "error"
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0        # prompt tokens served by the prefix cache (OpenAI usage.cached_tokens)


class Engine:
    def __init__(self, model, cache, *, max_num_batched_tokens: int = 512, prefill_chunk_tokens: int = 256,
                 async_map: bool = True, tokenizer=None, seed: int = 0):
        if max_num_batched_tokens < 1 or prefill_chunk_tokens < 1:
            raise VmemInvalidArgument("max_num_batched_tokens and prefill_chunk_tokens must be >= 1")
        self.model = model
        self.cache = cache
        self.async_map = async_map
        self.tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
        self.scheduler = Scheduler(cache, max_num_batched_tokens=max_num_batched_tokens,
                                   prefill_chunk_tokens=prefill_chunk_tokens)
        self._seqs: dict[str, Sequence] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._seed_counter = itertools.count(seed * 1_000_003)
        # a checkpoint may stop on several tokens (generation_config.json); the byte tokenizer on <eos>
        eos_id = getattr(self.tokenizer, "eos_id", None)
        self._stop_ids = frozenset(getattr(self.tokenizer, "stop_token_ids", None)
                                   or ([] if eos_id is None else [eos_id]))
        self.counters = defaultdict(float)     # steps, tokens, seconds spent where

    # ------------------------------------------------------------ public API

    @property
    def max_seq_len(self) -> int:
        """Longest sequence (prompt + output) a request may reach: the cache's max_seq_len, or the
        model's max_position (its rotary table) where that is smaller."""
        max_position = getattr(getattr(self.model, "config", None), "max_position", None)
        if max_position is None:
            return self.cache.spec.max_seq_len
        return min(self.cache.spec.max_seq_len, max_position)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending_outputs)

    def add_request(self, req: Request) -> None:
        """Queue a request. Raises VmemInvalidArgument (and queues nothing) if it can never run."""
        p = req.params
        if req.request_id in self._seqs:
            raise VmemInvalidArgument(f"request id {req.request_id!r} is already in the engine")
        if not req.prompt_ids:
            raise VmemInvalidArgument("prompt is empty")
        p.check()
        total = len(req.prompt_ids) + p.max_tokens
        if total > self.max_seq_len:
            raise VmemInvalidArgument(f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({p.max_tokens}) = "
                                      f"{total} exceeds the engine's max_seq_len {self.max_seq_len}")
        vocab = self.model.config.vocab_size
        if not all(_is_int(t) for t in req.prompt_ids):
            raise VmemInvalidArgument("prompt token ids must be integers")
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= vocab:
            raise VmemInvalidArgument(f"prompt token ids must be in [0, {vocab})")
        seq = Sequence(req, list(req.prompt_ids), len(req.prompt_ids))
        if p.temperature > 0:
            seq.generator = torch.Generator().manual_seed(p.seed if p.seed is not None else next(self._seed_counter))
        self._seqs[req.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Free the request's slot now; its final output (finish_reason "abort") comes with the next step."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.finish(seq, "abort")
        self.counters["aborted"] += 1
        self._pending_outputs.append(self._output(seq, []))

    def maintain(self) -> None:
        """Let an elastic cache give budget pages back (allocator/elastic.py); the server loop calls this
        while idle, step() on every step. No-op for other caches."""
        self.cache.maintain()

    def step(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        self.maintain()
        batch = self.scheduler.schedule()
        for seq in batch.failed:
            self._seqs.pop(seq.request_id, None)
            self.counters["failed"] += 1
            outputs.append(self._output(seq, []))
        if not batch.seqs:
            if self.scheduler.budget_blocked:
                time.sleep(BUDGET_POLL_S)      # other tenants hold the memory: do not spin
            return outputs
        t0 = time.perf_counter()
        batch = self._map(batch, outputs)
        t1 = time.perf_counter()
        if not batch.seqs:
            return outputs
        if self.async_map:
            self.cache.prefetch(self._next_needs(batch))
        last_logits = self._forward(batch.seqs, batch.num_new_tokens)
        t2 = time.perf_counter()
        tokens = self._sample_all(batch.seqs, last_logits)
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, tokens):
            seq.num_cached_tokens += n
            if seq.num_cached_tokens <= seq.num_prompt_tokens and self.cache.prefix_caching:
                # a prefill chunk ran: its full pages can serve other requests at once
                self.cache.cache_prefix(seq.slot, seq.token_ids[:seq.num_cached_tokens])
            if token is None:
                continue                       # a prefill chunk that does not reach the end yet
            seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self._seqs.pop(seq.request_id, None)
                self.counters["finished"] += 1
            outputs.append(self._output(seq, [token]))
        c = self.counters
        c["steps"] += 1
        c["batched_tokens"] += sum(batch.num_new_tokens)
        c["map_wait_s"] += t1 - t0
        c["forward_s"] += t2 - t1
        c["sample_s"] += time.perf_counter() - t2
        return outputs

    def stats(self) -> dict:
        """Cache statistics plus scheduler counters (for /metrics and reports)."""
        s = self.cache.stats()
        out = dict(s._asdict()) if hasattr(s, "_asdict") else dict(vars(s))
        out.update({"cache_kind": self.cache.kind, "num_running": self.num_running,
                    "num_waiting": self.num_waiting, "num_preemptions": self.num_preemptions,
                    "num_budget_waits": self.scheduler.num_budget_waits,
                    "prefix_cache_queries": self.scheduler.prefix_queries,
                    "prefix_cache_hits": self.scheduler.prefix_hits,
                    "prefix_cache_hit_requests": self.scheduler.prefix_hit_requests})
        out.update({k: (int(v) if float(v).is_integer() else v) for k, v in self.counters.items()})
        return out

    def reset_counters(self) -> None:
        """Zero the step counters and the scheduler's (a benchmark measures after its warm-up)."""
        self.counters.clear()
        self.scheduler.reset_counters()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for seq in list(self._seqs.values()):
            self.scheduler.finish(seq, "abort")
        self._seqs.clear()
        self.cache.close()

    # ------------------------------------------------------------ internals

    def _map(self, batch, outputs: list[RequestOutput]):
        """cache.step(needs); should it still run out of memory (the scheduler asked can_allocate, so
        only if the cache's view moved), the scheduler sheds a sequence and this retries."""
        while batch.seqs:
            try:
                self.cache.step(batch.needs)
                return batch
            except VmemOutOfMemory:
                logger.warning("cache.step ran out of memory after admission; shedding the newest sequence")
                batch, failed = self.scheduler.shed_newest(batch)
                if failed is not None:
                    self._seqs.pop(failed.request_id, None)
                    outputs.append(self._output(failed, []))
        return batch

    def _next_needs(self, batch) -> dict[int, int]:
        """What step t+1 will likely map: the next chunk, or one more token, for every sequence of
        step t that will still run (those reaching max_tokens now are left out)."""
        chunk, limit = self.scheduler.prefill_chunk_tokens, self.max_seq_len
        needs = {}
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            after = seq.num_cached_tokens + n
            remaining = len(seq.token_ids) - after
            if remaining == 0 and seq.num_output_tokens + 1 >= seq.request.params.max_tokens:
                continue
            needs[seq.slot] = min(after + (min(remaining, chunk) if remaining > 0 else 1), limit)
        return needs

    @torch.inference_mode()
    def _forward(self, seqs: list[Sequence], counts: list[int]) -> list[torch.Tensor | None]:
        """Run the model; returns, per sequence, logits [vocab] float32 (on the model's device) of its last
        fed token if it reached the end of its tokens (a token must be sampled), else None."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, n in enumerate(counts):
            groups[n].append(i)
        result: list[torch.Tensor | None] = [None] * len(seqs)
        device = getattr(self.cache, "device", torch.device("cpu"))
        for n, idx in groups.items():
            ids = torch.tensor([seqs[i].token_ids[seqs[i].num_cached_tokens:seqs[i].num_cached_tokens + n]
                                for i in idx], dtype=torch.int64, device=device)
            slots = torch.tensor([seqs[i].slot for i in idx], dtype=torch.int32, device=device)
            seqlens = torch.tensor([seqs[i].num_cached_tokens for i in idx], dtype=torch.int32, device=device)
            logits = self.model.forward(ids, self.cache, slots, seqlens, last_only=True)     # [B, 1, vocab]
            for row, i in enumerate(idx):
                if seqs[i].num_cached_tokens + n == len(seqs[i].token_ids):
                    result[i] = logits[row, -1]
        return result

    def _sample_all(self, seqs: list[Sequence], last_logits: list[torch.Tensor | None]) -> list[int | None]:
        """One token per sequence that has logits; all greedy ones in a single argmax."""
        tokens: list[int | None] = [None] * len(seqs)
        greedy = [i for i, lg in enumerate(last_logits)
                  if lg is not None and seqs[i].request.params.temperature < SAMPLING_EPS]
        if greedy:
            # max().indices: the first maximum, as argmax, ~3x faster on CPU for [32, 4096] float32
            picked = torch.stack([last_logits[i] for i in greedy]).max(dim=-1).indices.tolist()
            for i, token in zip(greedy, picked):
                tokens[i] = token
        for i, lg in enumerate(last_logits):
            if lg is not None and tokens[i] is None:
                tokens[i] = self._sample(seqs[i], lg)
        return tokens

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        p = seq.request.params
        logits = logits.float().cpu()
        if p.temperature < SAMPLING_EPS:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < p.top_p
            keep[0] = True                     # the top token, even when top_p rounds to 0 in float32
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.request.params
        if not p.ignore_eos and token in self._stop_ids:
            return "stop"
        if p.stop:
            text = self.tokenizer.decode(seq.token_ids[seq.num_prompt_tokens:])
            start = max(seq.stop_scan_from - max(len(s) for s in p.stop), 0)
            if any(s and s in text[start:] for s in p.stop):
                return "stop"
            seq.stop_scan_from = len(text)
        if seq.num_output_tokens >= p.max_tokens:
            return "length"
        return None

    def _output(self, seq: Sequence, new_ids: list[int]) -> RequestOutput:
        finished = seq.status is SeqStatus.FINISHED
        return RequestOutput(seq.request_id, new_ids, finished, seq.finish_reason if finished else None,
                             seq.num_prompt_tokens, seq.num_output_tokens, seq.num_prefix_cached)


def _default_tokenizer():
    from vmem.engine.tokenizer import ByteTokenizer
    return ByteTokenizer()


def build_engine(model: Any = "tiny", cache_kind: str = "vmem", *, memory_bytes: int | None = None,
                 max_batch: int = 16, max_seq_len: int | None = None, backend: str = "auto",
                 reclaim: str = "deferred", async_map: bool = True, seed: int = 0,
                 page_bytes: int | None = None, max_num_batched_tokens: int = 512,
                 prefill_chunk_tokens: int = 256, device: Any = None, dtype: Any = None,
                 tokenizer: Any = None, budget: Any = None, budget_policy: Any = None,
                 prefix_caching: bool = True) -> Engine:
    """A model on a fresh cache of `cache_kind`, in one call.

    model: a preset name ("tiny", "small", "medium"), any other string or path = a Hugging Face checkpoint
    directory (its tokenizer comes with it), a ModelConfig or a Model. dtype: None = the preset's float32 /
    the checkpoint's own; "float32", "bfloat16", "float16". memory_bytes: physical KV budget (None = enough
    for max_batch full-length sequences); max_seq_len: None = 1024, capped at the model's max_position;
    page_bytes: the vmem page size (None = the spec's default); prefix_caching: reuse cached prompt
    prefixes (vmem: page aliasing, paged: vLLM's block hashing; static has none).
    budget, budget_policy: vmem only: a shared KV budget (Budget, Lease, name or path) and its
    BudgetPolicy (allocator/elastic.py); memory_bytes then defaults to the budget's limit.
    """
    from vmem.allocator import KVCacheSpec, make_cache
    model, model_tokenizer = _build_model(model, seed, dtype)
    cfg = model.config
    if max_seq_len is None:
        max_seq_len = min(1024, cfg.max_position)
    elif cfg.sliding_window is not None and max_seq_len > cfg.sliding_window:
        from vmem.errors import VmemUnsupported
        raise VmemUnsupported(f"max_seq_len {max_seq_len} exceeds the checkpoint's sliding window of "
                              f"{cfg.sliding_window} tokens; the engine has no sliding-window attention, so it "
                              f"serves up to {cfg.sliding_window} tokens")
    spec = KVCacheSpec.for_model(cfg, max_batch=max_batch, max_seq_len=max_seq_len,
                                 **({} if page_bytes is None else {"page_bytes": page_bytes}))
    cache_kwargs = dict(memory_bytes=memory_bytes, backend=backend, device=device)
    if cache_kind == "vmem":
        cache_kwargs.update(reclaim=reclaim, async_map=async_map)
        if budget is not None:
            cache_kwargs.update(budget=budget, budget_policy=budget_policy)
    elif budget is not None:
        raise VmemInvalidArgument("a shared KV budget needs the vmem cache, not %r" % (cache_kind,))
    if cache_kind in ("vmem", "paged"):
        cache_kwargs.update(prefix_caching=prefix_caching)
    cache = make_cache(cache_kind, spec, **cache_kwargs)
    if hasattr(model, "to"):
        model = model.to(cache.device)          # "auto" puts the cache on the GPU when there is one
    return Engine(model, cache, max_num_batched_tokens=max_num_batched_tokens,
                  prefill_chunk_tokens=prefill_chunk_tokens, async_map=async_map and cache_kind == "vmem",
                  tokenizer=tokenizer if tokenizer is not None else model_tokenizer, seed=seed)


def _build_model(model: Any, seed: int, dtype: Any = None):
    """(model, its tokenizer or None for the byte tokenizer)."""
    import os

    from vmem.engine import model as model_mod
    if isinstance(model, (str, os.PathLike)) and str(model) not in model_mod.PRESETS:
        from vmem.engine.tokenizer import HFTokenizer
        return model_mod.Model.from_pretrained(model, dtype=dtype), HFTokenizer.from_pretrained(model)
    overrides = {} if dtype in (None, "auto") else {"dtype": dtype}
    if isinstance(model, str):
        return model_mod.Model(model_mod.ModelConfig.preset(model, seed=seed, **overrides)), None
    if isinstance(model, model_mod.ModelConfig):
        return model_mod.Model(dataclasses.replace(model, **overrides)), None
    return model, None
