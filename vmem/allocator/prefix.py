"""PrefixIndex: full columns of computed K/V, keyed by their token ids, for prefix caching by aliasing.

Note [Prefix caching by page aliasing]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Rationale: prompts repeat leading prefixes (system prompts, earlier turns of a conversation). Their K/V
depends only on the tokens before them, so a request whose prompt starts like an earlier one can skip
computing that part. On contiguous per-request virtual tensors the prefix must appear at the start of
the new request's own rows; vmem does that without copying: the physical pages holding it are *mapped*
into the new slot's first columns, and dense kernels read them through ``cache_batch_idx``.

Approach: the unit is a *column* (page j of every row of a slot: ``tokens_per_page`` token positions of
all layers, K and V). The index is a radix tree whose edges are whole columns: a node is one column,
keyed under its parent by the exact tuple of its tokens, and a root path of depth k names the K/V of
k * tokens_per_page leading tokens. Chosen over vLLM's flat map of chained block hashes because
  * eviction must be leaf first (a cached column is useless without its parents): the tree knows the
    children of a node, a flat hash map would have to count them on the side;
  * a slot maps its cached columns as a root path, so "how much of this prompt does a free slot still
    map" is an identity comparison of two node lists;
  * exact token keys leave no hash collision to reason about (vLLM pays sha256 per block for that);
one dict probe per column either way.

Implementation: each node holds the pool pages of its column ([rows_per_slot] int64) and the index
holds its own reference to them (PageTable.hold), so they outlive the slot that computed them. A node is
*locked* while a live request maps it (or will map it at its next step); unlocked nodes are what the
cache may evict, least recently used leaf first. Mechanism only: the cache (cache.py) decides what to
insert, maps and unmaps, and owns the page table; this module never touches memory.

Limitations: only whole columns are cached; the tokens of a prompt's last partial column are recomputed
(the engine feeds them with the rest of the prefill). The key is the token ids alone: K/V that also
depends on something else (LoRA, multimodal inputs) would need it in the key.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np


class PrefixNode:
    """One cached column: ``phys`` [rows_per_slot] int64 pool pages of column ``column`` (0-based depth)."""

    __slots__ = ("key", "parent", "children", "phys", "column", "last_used", "lock", "slots")

    def __init__(self, key: tuple, parent: "PrefixNode | None", phys: np.ndarray | None, column: int):
        self.key = key
        self.parent = parent
        self.children: dict[tuple, PrefixNode] = {}
        self.phys = phys
        self.column = column
        self.last_used = 0
        self.lock = 0                 # live requests mapping it (or about to)
        self.slots: set[int] = set()  # slots whose column `column` maps these pages (live or idle)

    def __repr__(self) -> str:
        return "PrefixNode(column=%d, lock=%d, slots=%s)" % (self.column, self.lock, sorted(self.slots))


class PrefixIndex:
    """Radix tree of cached columns (Note [Prefix caching by page aliasing]).

    Invariants (``check()``): children are keyed by their tokens (tokens_per_column of them) and point
    back at their parent, one column deeper; ``num_nodes`` and ``num_locked`` count the tree; a locked
    node's parent is locked (a request maps a root path).
    """

    def __init__(self, tokens_per_column: int):
        self.tokens_per_column = int(tokens_per_column)
        self.root = PrefixNode((), None, None, -1)
        self.num_nodes = 0
        self.num_locked = 0
        self._clock = 0

    # ---- lookup ---------------------------------------------------------------------------
    def keys(self, token_ids: Sequence[int], first_column: int, end_column: int) -> list[tuple]:
        """Keys of columns [first_column, end_column) of ``token_ids`` (which must cover them)."""
        t = self.tokens_per_column
        ids = list(token_ids[first_column * t:end_column * t])
        return [tuple(ids[i:i + t]) for i in range(0, len(ids), t)]

    def match(self, token_ids: Sequence[int], max_columns: int) -> list[PrefixNode]:
        """The longest cached root path spelling token_ids' first columns, at most ``max_columns``. Pure."""
        node, path = self.root, []
        for key in self.keys(token_ids, 0, min(max_columns, len(token_ids) // self.tokens_per_column)):
            node = node.children.get(key)
            if node is None:
                break
            path.append(node)
        return path

    @property
    def num_evictable(self) -> int:
        return self.num_nodes - self.num_locked

    def touch(self, nodes: Sequence[PrefixNode]) -> None:
        """Mark used now (LRU); deeper nodes count as more recent, so a path is evicted tail first."""
        for node in nodes:
            self._clock += 1
            node.last_used = self._clock

    # ---- changes --------------------------------------------------------------------------
    def add(self, parent: PrefixNode | None, key: tuple, phys: np.ndarray) -> PrefixNode:
        """A new child column under ``parent`` (None: the root). The caller checked the key is absent."""
        parent = self.root if parent is None else parent
        node = PrefixNode(key, parent, phys, parent.column + 1)
        parent.children[key] = node
        self.num_nodes += 1
        self.touch([node])
        return node

    def lock(self, nodes: Sequence[PrefixNode]) -> None:
        for node in nodes:
            node.lock += 1
            if node.lock == 1:
                self.num_locked += 1

    def unlock(self, nodes: Sequence[PrefixNode]) -> None:
        for node in nodes:
            node.lock -= 1
            if node.lock == 0:
                self.num_locked -= 1

    def plan_eviction(self, num_nodes: int) -> list[PrefixNode]:
        """Up to ``num_nodes`` unlocked nodes, least recently used leaf first (a parent becomes a leaf
        once its children are taken). Pure: ``remove`` carries the plan out."""
        heap = [(n.last_used, id(n), n) for n in self._iter() if n.lock == 0 and not n.children]
        heapq.heapify(heap)
        left = {}
        chosen: list[PrefixNode] = []
        while heap and len(chosen) < num_nodes:
            _, _, node = heapq.heappop(heap)
            chosen.append(node)
            parent = node.parent
            if parent is not self.root and parent.lock == 0:
                left[id(parent)] = left.get(id(parent), len(parent.children)) - 1
                if left[id(parent)] == 0:
                    heapq.heappush(heap, (parent.last_used, id(parent), parent))
        return chosen

    def remove(self, nodes: Sequence[PrefixNode]) -> None:
        """Detach nodes, children before parents (as plan_eviction orders them); they must be unlocked."""
        for node in nodes:
            del node.parent.children[node.key]
            self.num_nodes -= 1

    def restore(self, nodes: Sequence[PrefixNode]) -> None:
        """Undo ``remove(nodes)`` (a step that failed after evicting them)."""
        for node in reversed(nodes):
            node.parent.children[node.key] = node
            self.num_nodes += 1

    # ---- checks ---------------------------------------------------------------------------
    def _iter(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def nodes(self) -> list[PrefixNode]:
        return list(self._iter())

    def check(self) -> list[str]:
        problems = []
        count = locked = 0
        stack = [self.root]
        while stack:
            parent = stack.pop()
            for key, node in parent.children.items():
                count += 1
                locked += node.lock > 0
                if node.key != key or len(key) != self.tokens_per_column:
                    problems.append("index node at column %d has a wrong key" % node.column)
                if node.parent is not parent or node.column != parent.column + 1:
                    problems.append("index node at column %d is not linked to its parent" % node.column)
                if node.lock < 0 or (node.lock and parent is not self.root and not parent.lock):
                    problems.append("index node at column %d is locked without its parent" % node.column)
                stack.append(node)
        if (count, locked) != (self.num_nodes, self.num_locked):
            problems.append("index counts %d nodes (%d locked), the tree holds %d (%d)"
                            % (self.num_nodes, self.num_locked, count, locked))
        return problems
