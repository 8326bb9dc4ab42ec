"""Allocator stress test for your own configuration: ``python -m vmem.stress`` or ``vmem stress``.

Randomised traffic on a VirtualKVCache: requests arrive (alloc + prefill), decode in batches, finish
(free), idle slots are reclaimed, steps run out of memory, native map/unmap calls fail on purpose
(injected faults), and with ``--async`` steps are prefetched on the native worker. Every request
writes its tag at the tokens it grows into; the harness checks that every live request still reads
its tags back and that check_integrity() holds (page table, backend table, mapping count, OS-backed
bytes). It reports operations per second, failures survived and anything lost (must be nothing).
Exit status: 0 when nothing was lost and every integrity check passed, 1 otherwise, 2 for a configuration
vmem refuses (bad spec, memory budget or backend).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from vmem.allocator import KVCacheSpec, VirtualKVCache
from vmem.errors import VmemDriverError, VmemError, VmemIntegrityError, VmemMapLimitError, VmemOutOfMemory

PROBES_PER_SLOT = 32


class Stress:
    """The traffic generator and its model of what every live request wrote."""

    def __init__(self, args):
        self.args = args
        self.rng = np.random.default_rng(args.seed)
        self.spec = KVCacheSpec(num_layers=args.layers, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                                dtype=getattr(torch, args.dtype), max_batch=args.max_batch,
                                max_seq_len=args.max_seq_len, page_bytes=args.page_bytes, layout=args.layout,
                                layer_group_size=args.group)
        self.cache = VirtualKVCache(self.spec, memory_bytes=int(args.memory_mb * 2**20), backend=args.backend,
                                    reclaim=args.reclaim, async_map=args.async_map)
        self.lengths: dict[int, int] = {}
        self.targets: dict[int, int] = {}
        self.tags: dict[int, float] = {}
        self.probes: dict[int, list[int]] = {}
        self.next_tag = 1.0
        # failures_survived: steps that failed natively (rolled back) plus failed prefetches (undone)
        self.counts = dict(ops=0, steps=0, allocs=0, frees=0, reclaims=0, out_of_memory=0, faults_injected=0,
                           failures_survived=0, map_limit=0, integrity_checks=0, integrity_failures=0,
                           lost=0, prefetches=0)
        self.peak_mappings = 0
        self.errors: list[str] = []
        every = args.check_every or (1 if self.spec.num_virtual_pages <= 1 << 16 else 16)
        self.check_every = max(1, every)

    # ---- writing and reading tags --------------------------------------------------------
    def _cells(self, slot, tokens):
        """Probed cells of a slot: (K of layer 0, V of the last layer), each stacked over tokens."""
        k, _ = self.cache.kv(0)
        _, v = self.cache.kv(self.spec.num_layers - 1)
        if self.spec.layout == "HND":
            return torch.stack([k[slot, :, t] for t in tokens]), torch.stack([v[slot, :, t] for t in tokens])
        return torch.stack([k[slot, t] for t in tokens]), torch.stack([v[slot, t] for t in tokens])

    def _write(self, slot, first, end):
        if end <= first:
            return
        picks = sorted({first, end - 1, int(self.rng.integers(first, end))})
        k, _ = self.cache.kv(0)
        _, v = self.cache.kv(self.spec.num_layers - 1)
        for t in picks:
            for view in ((k[slot, :, t], v[slot, :, t]) if self.spec.layout == "HND" else (k[slot, t], v[slot, t])):
                view.fill_(self.tags[slot])
        probes = self.probes[slot]
        probes.extend(picks)
        if len(probes) > PROBES_PER_SLOT:
            del probes[1:len(probes) - PROBES_PER_SLOT + 1]

    def _verify(self):
        for slot, probes in self.probes.items():
            if not probes:
                continue
            for cells in self._cells(slot, probes):
                if not bool(torch.all(cells == self.tags[slot])):
                    self.counts["lost"] += 1
                    self.errors.append("slot %d lost data at tokens %s" % (slot, probes))
                    self.probes[slot] = []
                    break

    # ---- operations ----------------------------------------------------------------------
    def _step(self, needs):
        if not needs:
            return
        cache = self.cache
        if self.args.async_map and self.rng.random() < 0.5:
            cache.prefetch(needs)
            self.counts["prefetches"] += 1
        fault = self.rng.random() < self.args.fault_rate
        if fault:                          # the 1st, 2nd or 3rd OS call of this step fails
            cache.reservation.inject_fault(int(self.rng.integers(1, 4)))
            self.counts["faults_injected"] += 1
        try:
            cache.step(needs)
            error = None
        except (VmemOutOfMemory, VmemDriverError, VmemMapLimitError) as exc:
            error = exc
        finally:
            if fault:
                cache.reservation.inject_fault(0)
        if isinstance(error, VmemDriverError):
            self.counts["failures_survived"] += 1
            return
        if error is not None:
            self.counts["out_of_memory" if isinstance(error, VmemOutOfMemory) else "map_limit"] += 1
            self._preempt()
            return
        self.counts["steps"] += 1
        for slot, n in needs.items():
            self._write(slot, self.lengths[slot], n)
            self.lengths[slot] = n

    def _preempt(self):
        """Out of memory: finish the newest request, as a scheduler would preempt it."""
        if self.lengths:
            self._free(max(self.lengths, key=lambda s: self.tags[s]))

    def _free(self, slot):
        self.cache.free_slot(slot)
        for d in (self.lengths, self.targets, self.tags, self.probes):
            d.pop(slot, None)
        self.counts["frees"] += 1

    def _arrive(self):
        target = int(min(self.spec.max_seq_len, max(1, self.rng.lognormal(6.5, 1.0))))
        prompt = max(1, int(target * self.rng.uniform(0.5, 0.95)))
        slot = self.cache.alloc_slot(num_tokens=prompt)
        self.lengths[slot], self.targets[slot], self.probes[slot] = 0, target, []
        self.tags[slot] = self.next_tag
        self.next_tag += 1.0
        self.counts["allocs"] += 1
        self._step({slot: prompt})

    def _decode(self):
        tokens = int(self.rng.integers(1, 16))
        needs = {s: min(self.targets[s], n + tokens) for s, n in self.lengths.items()}
        self._step(needs)
        for s in [s for s, n in self.lengths.items() if n >= self.targets[s]]:
            self._free(s)

    def one_op(self):
        r = self.rng.random()
        if r < 0.3 and self.cache.num_free_slots:
            self._arrive()
        elif r < 0.85 and self.lengths:
            self._decode()
        elif r < 0.97 and self.lengths:
            self._free(int(self.rng.choice(list(self.lengths))))
        else:
            self.cache.reclaim_idle()
            self.counts["reclaims"] += 1
        self.counts["ops"] += 1
        self.peak_mappings = max(self.peak_mappings, self.cache.reservation.num_mappings)
        if self.counts["ops"] % self.check_every == 0:
            self.check()

    def check(self):
        self.counts["integrity_checks"] += 1
        try:
            self.cache.check_integrity()
        except VmemIntegrityError as exc:
            self.counts["integrity_failures"] += 1
            self.errors.append(str(exc))
        self._verify()

    def run(self) -> dict:
        t0 = time.perf_counter()
        deadline = t0 + self.args.seconds
        limit = self.args.max_ops or float("inf")
        while time.perf_counter() < deadline and self.counts["ops"] < limit:
            self.one_op()
        self.check()
        elapsed = time.perf_counter() - t0
        stats = self.cache.stats()
        self.counts["failures_survived"] += self.cache.counters["prefetch_failures"]
        report = {
            "spec": self.spec.describe(), "backend": self.cache.reservation.backend.name,
            "reclaim": self.args.reclaim, "async": self.args.async_map, "seconds": round(elapsed, 3),
            "ops_per_s": round(self.counts["ops"] / elapsed, 1), **self.counts,
            "peak_os_mappings": self.peak_mappings, "map_budget": self.cache.reservation.backend.info()["map_budget"],
            "peak_live_slots": stats.peak_live_slots, "pool_pages": stats.total_pages,
            "pages_mapped": stats.pages_mapped, "pages_unmapped": stats.pages_unmapped,
            "reclaimed_pages": stats.reclaimed_pages, "map_seconds": round(stats.map_seconds, 4),
            "unmap_seconds": round(stats.unmap_seconds, 4), "errors": self.errors[:10],
            "ok": self.counts["lost"] == 0 and self.counts["integrity_failures"] == 0,
        }
        self.cache.close()
        return report


def main(argv: list[str] | None = None) -> int:
    """``python -m vmem.stress [flags]``: the same as ``vmem stress [flags]`` (flags in vmem/cli.py)."""
    from vmem.cli import main as vmem_main
    return vmem_main(["stress", *(sys.argv[1:] if argv is None else argv)])


def run(args) -> int:
    """Run the harness for parsed ``vmem stress`` arguments; returns the exit status."""
    try:
        harness = Stress(args)
    except VmemError as exc:          # a spec, memory budget or backend this machine refuses
        print("vmem stress: %s" % exc, file=sys.stderr)
        return 2
    report = harness.run()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
