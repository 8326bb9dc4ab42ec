"""Continuous-batching scheduler: FCFS, chunked prefill, admission by free pages, preemption by recompute.

One idea carries it: a sequence's tokens are `token_ids = prompt + generated`, of which the first
`num_cached_tokens` have K/V in the cache. Each step feeds a sequence its next pending tokens:

    token_ids:  [0 ........... num_cached_tokens) [num_cached_tokens ....... len(token_ids))
                 K/V in the cache                  pending: prefill chunk (many) or decode (one)

so prefill, chunked prefill, decode and recompute after preemption are the same operation, and a
token is sampled only when a step reaches the end of `token_ids`.

Policy per step (nano-vllm's, with vLLM's chunked prefill):
  1. running sequences, oldest first, get min(pending, prefill_chunk_tokens, token budget) tokens;
     if the cache cannot map what they need, the newest running sequence is preempted (slot freed,
     its K/V forgotten, back to the FRONT of the waiting queue) until it can;
  2. then, if nothing was preempted, waiting sequences are admitted in FCFS order while a slot, the
     token budget and the cache's free pages allow (the head of the queue blocks the rest). Memory
     must hold the newcomer's whole prefill plus a share (`new_token_ratio`, SGLang's policy) of the
     remaining max_tokens of it and of every running sequence; the share rises after a preemption
     and decays while none happen, so admission stops setting up the next preemption.
With a shared KV budget (allocator/elastic.py), memory other tenants hold is not this engine's to
preempt for: when the budget (not the pool) is short while other tenants hold reclaimable pages,
running sequences wait (up to `budget_wait_s`, then preemption as usual) and the demand is recorded so
those tenants give pages back; a waiting request whose prefill only the budget refuses stays queued.
The scheduler decides and holds slots; the engine maps (`cache.step(needs)`) and runs the model.
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request's state inside the engine."""
    request: Any                          # engine.Request: .request_id, .prompt_ids, .params
    token_ids: list[int]                  # prompt + generated
    num_prompt_tokens: int
    slot: int | None = None               # cache slot while RUNNING
    num_cached_tokens: int = 0            # tokens whose K/V is in the cache
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    generator: Any = None                 # torch.Generator for seeded sampling
    stop_scan_from: int = 0               # output chars already checked for stop strings
    num_prefix_cached: int = 0            # prompt tokens found in the prefix cache at first admission

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def max_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.request.params.max_tokens

    @property
    def num_pending_tokens(self) -> int:
        return len(self.token_ids) - self.num_cached_tokens


class ScheduledBatch(NamedTuple):
    seqs: list[Sequence]                  # in scheduling order
    num_new_tokens: list[int]             # tokens fed to each sequence this step
    needs: dict[int, int]                 # slot -> total tokens that must be mapped (cache.step)
    failed: list[Sequence]                # could never fit: finished with "error"


@dataclass
class Scheduler:
    cache: Any                            # KVCacheManager
    max_num_batched_tokens: int = 512
    prefill_chunk_tokens: int = 256
    # Admission reserves room for this share of each sequence's remaining max_tokens (SGLang's
    # new_token_ratio): raised after a preemption, decayed while none happen.
    new_token_ratio: float = 0.5
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.002
    new_token_ratio_bump: float = 0.25
    # Shared budget: wait this long for other tenants' reclaimable pages before preempting.
    budget_wait_s: float = 2.0
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    num_preemptions: int = 0
    num_budget_waits: int = 0             # steps that waited for the budget instead of preempting
    budget_blocked: bool = False          # the last schedule() waited for the budget
    _budget_wait_since: float | None = None
    prefix_queries: int = 0               # prompt tokens looked up in the prefix cache (first admissions)
    prefix_hits: int = 0                  # of which found cached
    prefix_hit_requests: int = 0          # first admissions that found some

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [], {}, [])
        self.budget_blocked = False
        before = self.num_preemptions
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if self.num_preemptions == before:
            self._admit_waiting(batch, budget)
            self.new_token_ratio = max(self.min_new_token_ratio, self.new_token_ratio - self.new_token_ratio_decay)
        else:
            self.new_token_ratio = min(1.0, self.new_token_ratio + self.new_token_ratio_bump)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        """Oldest first; preempt the newest while the cache cannot map what this step needs."""
        plan, left = [], budget
        for seq in self.running:
            n = min(seq.num_pending_tokens, self.prefill_chunk_tokens, left)
            if n > 0:
                plan.append((seq, n))
                left -= n
        if self.cache.can_allocate({seq.slot: seq.num_cached_tokens + n for seq, n in plan}):
            for seq, n in plan:                # fast path: one query when everything fits
                self._add(batch, seq, n)
            self._budget_wait_since = None
            return left
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            n = min(seq.num_pending_tokens, self.prefill_chunk_tokens, budget)
            if n <= 0:
                i += 1
                continue
            trial = {**batch.needs, seq.slot: seq.num_cached_tokens + n}
            if not self.cache.can_allocate(trial) and self._wait_for_budget(trial):
                return budget             # this and later sequences wait; nothing is preempted
            while not self.cache.can_allocate(trial) and self.running[-1] is not seq:
                self.preempt(self.running[-1])
            if not self.cache.can_allocate(trial):
                if i == 0:                # alone and still too big: it can never run
                    self.finish(seq, "error")
                    batch.failed.append(seq)
                else:
                    self.preempt(seq)
                continue                  # running[i] is now the next sequence (or none)
            self._add(batch, seq, n)
            budget -= n
            i += 1
        return budget

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        """FCFS: admit while a slot, the token budget and memory allow; the head blocks the rest."""
        while self.waiting and budget > 0 and self.cache.num_free_slots > 0:
            seq = self.waiting[0]
            # hint: a slot already mapped that far; the prefix cache attaches what it holds of the tokens
            slot = self.cache.alloc_slot(seq.max_total_tokens, token_ids=seq.token_ids)
            seq.num_cached_tokens = self.cache.num_cached_tokens(slot)
            n = min(seq.num_pending_tokens, self.prefill_chunk_tokens, budget)
            need = self._reservation(batch, slot, seq)
            if not self.cache.can_allocate(need):
                budget_short = self.cache.budget_short(need)   # other tenants hold the memory
                self.cache.free_slot(slot)
                seq.num_cached_tokens = 0
                if self.running or budget_short:
                    self.budget_blocked |= budget_short
                    break
                self.waiting.popleft()        # nothing else holds memory and its prefill does not fit
                seq.status, seq.finish_reason = SeqStatus.FINISHED, "error"
                batch.failed.append(seq)
                continue
            self.waiting.popleft()
            if seq.num_preemptions == 0:      # vLLM's prefix-cache queries and hits, in tokens
                seq.num_prefix_cached = seq.num_cached_tokens
                self.prefix_queries += len(seq.token_ids)
                self.prefix_hits += seq.num_cached_tokens
                self.prefix_hit_requests += seq.num_cached_tokens > 0
            seq.slot, seq.status = slot, SeqStatus.RUNNING
            self.running.append(seq)
            self._add(batch, seq, n)
            budget -= n

    def _reservation(self, batch: ScheduledBatch, slot: int, seq: Sequence) -> dict[int, int]:
        """What must fit to admit `seq` into `slot`: its whole prefill plus a share of its output, and
        the same share of every running sequence's remaining output (so admission does not set up
        the next preemption). Alone, only its prefill and first token must fit."""
        limit = self.cache.spec.max_seq_len
        first = min(len(seq.token_ids) + 1, limit)
        if not self.running:
            return {slot: first}
        need = {s.slot: max(self._expected_tokens(s), batch.needs.get(s.slot, 0)) for s in self.running}
        need[slot] = max(first, self._expected_tokens(seq))
        return need

    def _expected_tokens(self, seq: Sequence) -> int:
        remaining = seq.request.params.max_tokens - seq.num_output_tokens
        grow = math.ceil(self.new_token_ratio * max(remaining, 0))
        return min(len(seq.token_ids) + grow, seq.max_total_tokens, self.cache.spec.max_seq_len)

    def _wait_for_budget(self, needs: dict[int, int]) -> bool:
        """Budget short while other tenants hold reclaimable pages: wait (bounded by budget_wait_s)."""
        if not self.cache.budget_short(needs) or not self.cache.budget_reclaimable_elsewhere():
            return False
        now = time.monotonic()
        if self._budget_wait_since is None:
            self._budget_wait_since = now
        if now - self._budget_wait_since > self.budget_wait_s:
            return False                       # waited long enough: preempt as without a budget
        self.num_budget_waits += 1
        self.budget_blocked = True
        return True

    @staticmethod
    def _add(batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        batch.needs[seq.slot] = seq.num_cached_tokens + n

    def shed_newest(self, batch: ScheduledBatch) -> tuple[ScheduledBatch, Sequence | None]:
        """The cache refused `batch` after admission (its view moved since can_allocate): preempt the
        newest scheduled sequence, or fail it with "error" when it runs alone (nothing to wait for).
        Returns the batch without it and the failed sequence (None when it was preempted)."""
        seq = max(batch.seqs, key=self.running.index)
        failed = None
        if len(self.running) == 1:
            self.finish(seq, "error")
            failed = seq
        else:
            self.preempt(seq)
        keep = [i for i, s in enumerate(batch.seqs) if s is not seq]
        seqs = [batch.seqs[i] for i in keep]
        return batch._replace(seqs=seqs, num_new_tokens=[batch.num_new_tokens[i] for i in keep],
                              needs={s.slot: batch.needs[s.slot] for s in seqs}), failed

    def reset_counters(self) -> None:
        """Zero the scheduler's counters (benchmarks measure after a warm-up)."""
        self.num_preemptions = self.prefix_queries = self.prefix_hits = self.prefix_hit_requests = 0
        self.num_budget_waits = 0

    def preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the K/V, keep the tokens, go back to the front of the queue."""
        self.running.remove(seq)
        self._release(seq)
        seq.slot, seq.num_cached_tokens, seq.status = None, 0, SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and free its slot at once (running or waiting)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
            seq.slot = None
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason

    def _release(self, seq: Sequence) -> None:
        """Free the slot; the pages of what it computed enter the prefix cache first (a preempted
        sequence finds them again when it is readmitted)."""
        self.cache.cache_prefix(seq.slot, seq.token_ids[:seq.num_cached_tokens])
        self.cache.free_slot(seq.slot)
