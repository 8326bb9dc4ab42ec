"""PrefixSlots: VirtualKVCache's side of prefix caching (Note [Prefix caching by page aliasing] in prefix.py).

prefix.py is the index alone (a radix tree of columns, pure); this mixin ties it to the cache's slots:
choosing the free slot that still maps a prompt's cached prefix, attaching a match to a slot (the next
step maps it with the growth), entering a slot's full columns, evicting, and invariant 6 of
check_integrity. It reads and writes the cache's state (``_cols``, ``_paths``, ``_attach``, ``_index``,
``_table``), so it is part of VirtualKVCache, not a class of its own; the public methods run under the
cache's lock like the rest.
"""
from __future__ import annotations

import numpy as np

from vmem.allocator.base import synchronized, transaction
from vmem.allocator.prefix import PrefixNode
from vmem.errors import VmemSlotError


class PrefixSlots:
    """Prefix-caching methods of VirtualKVCache (mixed into it; see the module docstring)."""

    def _choose_slot(self, free: np.ndarray, num_tokens: int | None) -> int:
        """The free slot mapping most of the prompt's cached prefix (no map call for it); without one,
        preferably a slot mapping no cached columns (it keeps them for a later match); then SlotPolicy."""
        free = free[self._cols.shared[free] == 0]
        if not free.size:
            raise VmemSlotError("every free slot still holds shared pages whose unmap failed")
        common = np.array([self._common(s, self._wanted) for s in free.tolist()], dtype=np.int64)
        if common.size and common.max() > 0:
            free = free[common == common.max()]
        elif np.any(self._cols.cached[free] == 0):
            free = free[self._cols.cached[free] == 0]
        needed = None if num_tokens is None else self.spec.row_pages_for_tokens(num_tokens)
        return self.slot_policy.choose(free, self._cols.columns, needed)


    def _common(self, slot: int, nodes: list[PrefixNode]) -> int:
        """Leading columns of ``nodes`` that ``slot`` maps already."""
        path, n = self._paths[slot], min(int(self._cols.cached[slot]), len(nodes))
        for i in range(n):
            if path[i] is not nodes[i]:
                return i
        return n


    def _attach_prefix(self, slot: int, token_ids: list[int]) -> int:
        """Attach the cached prefix alloc_slot matched: the columns the slot maps already stay (a private
        tail too, if nothing cached must be mapped after them); the rest is mapped by the next step."""
        match = self._wanted
        if not match:
            return 0
        cols = self._cols
        common = self._common(slot, match)
        if cols.columns[slot] > common and (cols.cached[slot] > common or len(match) > common):
            self._shrink({slot: common}, trim=True)
            self._counters["prefix_unmap_calls"] += 1
        self._paths[slot] = self._paths[slot][:common]
        if len(match) > common:
            self._attach[slot] = match[common:]
        self._index.lock(match)
        self._index.touch(match)
        self._counters["prefix_inplace_pages"] += common * self.spec.rows_per_slot
        return len(match) * self._tpp


    def _drop_prefix(self, slot: int) -> None:
        """A live slot stops using its cached prefix (freed, or made to share another's): unlock it."""
        self._index.unlock(self._paths[slot][:int(self._cols.cached[slot])])
        self._index.unlock(self._attach.pop(slot, []))


    @synchronized
    def match_prefix(self, token_ids) -> int:
        self._check_open()
        ids = self._check_token_ids(token_ids)
        if not self.prefix_caching:
            return 0
        return len(self._index.match(ids, (len(ids) - 1) // self._tpp)) * self._tpp


    @transaction
    def cache_prefix(self, slot: int, token_ids) -> int:
        """Enter the live slot's full columns among ``token_ids`` (K/V computed, within its length) into
        the prefix index. Stops at a column the index holds already from another slot (that copy stays
        private), and does nothing for a slot holding share_prefix pages beyond its cached columns."""
        self._check_open()
        slot = self._check_slot(slot)
        ids = self._check_token_ids(token_ids)
        cols = self._cols
        if not self.prefix_caching or slot in self._attach or cols.shared[slot] > cols.cached[slot]:
            return int(self._cached_tokens[slot])
        self._settle()
        c = int(cols.cached[slot])
        full = min(min(len(ids), int(self._lengths[slot])) // self._tpp, int(cols.columns[slot]))
        if full <= c:
            return int(self._cached_tokens[slot])
        path = self._paths[slot][:c]
        parent = path[-1] if path else self._index.root
        starts = self.spec.slot_row_starts(slot)
        for key in self._index.keys(ids, c, full):
            if key in parent.children:
                break
            phys = self._table.phys[starts + len(path)].astype(np.int64)
            self._table.hold(phys)
            parent = self._index.add(parent, key, phys)
            parent.slots.add(slot)
            self._index.lock([parent])
            path.append(parent)
        self._paths[slot] = path
        self._counters["prefix_cached_pages"] += (len(path) - c) * self.spec.rows_per_slot
        cols.cached[slot] = len(path)
        self._cached_tokens[slot] = max(int(self._cached_tokens[slot]), len(path) * self._tpp)
        return int(self._cached_tokens[slot])


    @synchronized
    def prefix_stats(self) -> dict:
        """Prefix cache counters: pages mapped from the index into slots (map calls carrying them), pages
        found already in place, pages entered and evicted, pages cached now, KV bytes copied (no code
        path copies KV: always 0)."""
        c, rows = self._counters, self.spec.rows_per_slot
        return {"hit_pages": c["prefix_mapped_pages"] + c["prefix_inplace_pages"],
                "mapped_pages": c["prefix_mapped_pages"], "inplace_pages": c["prefix_inplace_pages"],
                "map_calls": c["prefix_map_calls"], "unmap_calls": c["prefix_unmap_calls"],
                "cached_pages_total": c["prefix_cached_pages"], "evicted_pages": c["prefix_evicted_pages"],
                "cached_pages": self._index.num_nodes * rows, "kv_bytes_copied": c["kv_bytes_copied"],
                "page_tokens": self._tpp}


    def _attachment_pages(self, attach) -> tuple[np.ndarray, np.ndarray]:
        """Virtual and pool pages ([n] int64 each) of attached index columns, row after row."""
        virt, phys = [], []
        for s, nodes in attach:
            first = int(self._cols.columns[s])
            virt.append(self.spec.slot_virtual_pages(s, first, first + len(nodes)))     # [rows, k]
            phys.append(np.stack([n.phys for n in nodes], axis=1))                        # [rows, k]
        if not virt:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return (np.concatenate([v.reshape(-1) for v in virt]),
                np.concatenate([p.reshape(-1) for p in phys]).astype(np.int64))


    def _realize_attachments(self, attach, num_pages: int) -> None:
        for s, nodes in attach:
            del self._attach[s]
            for node in nodes:
                node.slots.add(s)
            self._paths[s] = self._paths[s][:int(self._cols.cached[s])] + nodes
            self._cols.cached[s] += len(nodes)
        if attach:
            self._counters["prefix_mapped_pages"] += int(num_pages)
            self._counters["prefix_map_calls"] += 1


    def _evict(self, nodes: list[PrefixNode]) -> np.ndarray:
        """Drop unlocked nodes (mapped by no slot any more) from the index; returns the pages freed."""
        if not nodes:
            return np.zeros(0, dtype=np.int64)
        self._index.remove(nodes)
        self._counters["prefix_evicted_pages"] += len(nodes) * self.spec.rows_per_slot
        return self._table.release(np.concatenate([n.phys for n in nodes]))


    def _check_prefix(self, shape, column) -> list[str]:
        """Invariant 6 (class docstring)."""
        spec, table, cols, index = self.spec, self._table, self._cols, self._index
        problems = index.check()
        nodes = index.nodes()
        held = np.zeros(table.num_pool_pages, dtype=np.int64)
        for node in nodes:
            np.add.at(held, node.phys, 1)
        if not np.array_equal(held, table.held):
            problems.append("the page table's held references are not the prefix index's pages")
        writable = np.isin(table.phys, np.flatnonzero(table.held)).reshape(shape) & (column >= cols.cached[None, :, None, None])
        if writable.any():
            problems.append("slots %s map cached pages outside their cached columns (they could write them)"
                            % np.flatnonzero(writable.any(axis=(0, 2, 3))).tolist())
        users = {id(n): set() for n in nodes}
        locks = {id(n): 0 for n in nodes}
        for s in range(spec.max_batch):
            c = int(cols.cached[s])
            path = self._paths[s][:c] if len(self._paths[s]) >= c else None
            if path is None or cols.columns[s] < c or any(n.column != i or id(n) not in users or
                                                          (i and n.parent is not path[i - 1])
                                                          for i, n in enumerate(path)):
                problems.append("slot %d: its cached columns are not a root path of the index" % s)
                continue
            if c and not np.array_equal(table.phys[spec.slot_virtual_pages(s, 0, c)],
                                        np.stack([n.phys for n in path], axis=1)):
                problems.append("slot %d: its cached columns do not map the index's pages" % s)
            attached = self._attach.get(s, [])
            if self._live[s] and self._cached_tokens[s] < (c + len(attached)) * self._tpp:
                problems.append("live slot %d could write its cached prefix" % s)
            for n in path:
                users[id(n)].add(s)
            for n in path + attached if self._live[s] else ():
                locks[id(n)] += 1
            if attached and (not self._live[s] or attached[0].column != c or id(attached[-1]) not in users):
                problems.append("slot %d: a bad pending attachment" % s)
        if any(n.slots != users[id(n)] or n.lock != locks[id(n)] for n in nodes):
            problems.append("index nodes' slots or locks disagree with the slots' cached columns")
        return problems
