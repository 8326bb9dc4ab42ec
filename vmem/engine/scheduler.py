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
     token budget and the cache's free pages allow (the head of the queue blocks the rest).
The scheduler decides and holds slots; the engine maps (`cache.step(needs)`) and runs the model.
"""

from __future__ import annotations

import enum
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
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    num_preemptions: int = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        seqs, counts, needs, failed = [], [], {}, []
        preempted = False
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            n = min(seq.num_pending_tokens, self.prefill_chunk_tokens, budget)
            if n <= 0:
                i += 1
                continue
            trial = {**needs, seq.slot: seq.num_cached_tokens + n}
            while not self.cache.can_allocate(trial) and self.running[-1] is not seq:
                self.preempt(self.running[-1])
                preempted = True
            if not self.cache.can_allocate(trial):
                if i == 0:                # alone and still too big: it can never run
                    self.finish(seq, "error")
                    failed.append(seq)
                else:
                    self.preempt(seq)
                    preempted = True
                continue                  # running[i] is now the next sequence (or none)
            seqs.append(seq), counts.append(n)
            needs[seq.slot] = trial[seq.slot]
            budget -= n
            i += 1
        while self.waiting and budget > 0 and not preempted and self.cache.num_free_slots > 0:
            seq = self.waiting[0]
            n = min(seq.num_pending_tokens, self.prefill_chunk_tokens, budget)
            slot = self.cache.alloc_slot(seq.max_total_tokens)   # hint: a slot already mapped that far
            trial = {**needs, slot: n}
            if not self.cache.can_allocate(trial):
                self.cache.free_slot(slot)
                if not self.running:      # nothing holds memory and it still does not fit
                    self.waiting.popleft()
                    seq.status, seq.finish_reason = SeqStatus.FINISHED, "error"
                    failed.append(seq)
                    continue
                break
            self.waiting.popleft()
            seq.slot, seq.status = slot, SeqStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq), counts.append(n)
            needs[slot] = n
            budget -= n
        return ScheduledBatch(seqs, counts, needs, failed)

    def preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the K/V, keep the tokens, go back to the front of the queue."""
        self.running.remove(seq)
        self.cache.free_slot(seq.slot)
        seq.slot, seq.num_cached_tokens, seq.status = None, 0, SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and free its slot at once (running or waiting)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.cache.free_slot(seq.slot)
            seq.slot = None
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
