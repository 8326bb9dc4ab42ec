"""Block-id and page arithmetic of the paged-compatible virtual layout. Pure: no vLLM import.

Each request gets a slot for its life, and its blocks are the contiguous id range of that slot:

    block id   0 | 1 .. M | M+1 .. 2M | ... | 1+(S-1)M .. SM
    owner   null | slot 0 | slot 1    | ... | slot S-1            (M = blocks_per_slot, S = num_slots)

    block_id(slot, j) = 1 + slot*M + j          j in [0, M): the request's j-th block
    slot_of(b) = (b-1) // M,  index_in_slot(b) = (b-1) % M

Block 0 is vLLM's null block (BlockPool keeps it out of the free queue). vLLM places layer ``l`` of
block ``b`` at ``offset + l*layer_stride + b*block_stride`` bytes of one backing allocation, so with
these ids a request's K/V is one contiguous virtual range per layer (layer-outermost layouts) or one
contiguous range over all layers (block-outermost layouts), exactly as in vAttention.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vmem.errors import VmemInvalidArgument


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """``num_slots`` requests of at most ``blocks_per_slot`` blocks each, plus the null block."""

    num_slots: int
    blocks_per_slot: int

    def __post_init__(self):
        for name in ("num_slots", "blocks_per_slot"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise VmemInvalidArgument("SlotLayout.%s must be a positive int, got %r" % (name, value))

    @classmethod
    def for_model(cls, max_num_seqs: int, max_model_len: int, block_size: int) -> "SlotLayout":
        """One slot per schedulable sequence, each long enough for ``max_model_len`` tokens."""
        if block_size <= 0 or max_model_len <= 0:
            raise VmemInvalidArgument("block_size and max_model_len must be positive, got %r, %r"
                                      % (block_size, max_model_len))
        return cls(int(max_num_seqs), -(-int(max_model_len) // int(block_size)))

    @property
    def num_virtual_blocks(self) -> int:
        return 1 + self.num_slots * self.blocks_per_slot

    def block_id(self, slot: int, index: int) -> int:
        if not 0 <= slot < self.num_slots or not 0 <= index < self.blocks_per_slot:
            raise VmemInvalidArgument("block (slot %r, index %r) outside %d slots x %d blocks"
                                      % (slot, index, self.num_slots, self.blocks_per_slot))
        return 1 + slot * self.blocks_per_slot + index

    def block_ids(self, slot: int, first: int, end: int) -> list[int]:
        """Ids of blocks [first, end) of ``slot``."""
        if first < end:
            self.block_id(slot, first)
            self.block_id(slot, end - 1)
        return list(range(1 + slot * self.blocks_per_slot + first, 1 + slot * self.blocks_per_slot + end))

    def slot_of(self, block_id) -> int:
        return (int(block_id) - 1) // self.blocks_per_slot

    def index_in_slot(self, block_id) -> int:
        return (int(block_id) - 1) % self.blocks_per_slot


@dataclasses.dataclass(frozen=True)
class TensorPlacement:
    """Where vLLM puts one KVCacheTensor: ``num_layers`` layers of ``page_size_bytes`` per block."""

    offset_bytes: int
    num_layers: int
    layer_stride_bytes: int
    block_stride_bytes: int
    page_size_bytes: int


class BlockPages:
    """Which virtual pages of the reservation hold block ``b``, for every block at once.

    The byte ranges of block 0 (over all tensors and layers) are merged into runs; block ``b`` is the
    same runs moved by ``b * block_stride``. Every run must start and end on a page boundary, so no page
    holds bytes of two blocks (two slots' requests could then not be mapped independently); the block
    size is what makes that true (README: "Choosing the block size").
    """

    def __init__(self, placements: list[TensorPlacement], page_bytes: int, num_blocks: int):
        if not placements:
            raise VmemInvalidArgument("no KV cache tensors to place")
        strides = {p.block_stride_bytes for p in placements}
        if len(strides) != 1:
            raise VmemInvalidArgument("KV cache tensors with different block strides %s" % sorted(strides))
        self.page_bytes = int(page_bytes)
        self.num_blocks = int(num_blocks)
        self.block_stride_bytes = strides.pop()
        if self.block_stride_bytes % self.page_bytes:
            raise VmemInvalidArgument(
                "a block is %d bytes apart from the next, not a multiple of the %d-byte page: choose a "
                "block size whose KV bytes are a multiple of the page" % (self.block_stride_bytes, self.page_bytes))
        ranges = sorted((p.offset_bytes + layer * p.layer_stride_bytes, p.page_size_bytes)
                        for p in placements for layer in range(p.num_layers))
        runs: list[list[int]] = []
        for start, length in ranges:
            if runs and start <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], start + length)
            else:
                runs.append([start, start + length])
        for start, end in runs:
            if start % self.page_bytes or end % self.page_bytes:
                raise VmemInvalidArgument(
                    "block bytes [%d, %d) do not fill whole %d-byte pages: choose a block size whose KV bytes per "
                    "layer (layer-outermost layouts) or over all layers (block-outermost) are a multiple of "
                    "the page" % (start, end, self.page_bytes))
        self.base_pages = np.concatenate([np.arange(s // self.page_bytes, e // self.page_bytes, dtype=np.int64)
                                          for s, e in runs])
        self.pages_per_block = int(self.base_pages.size)
        self.stride_pages = self.block_stride_bytes // self.page_bytes
        self.num_bytes = max(p.offset_bytes + (p.num_layers - 1) * p.layer_stride_bytes
                             + (self.num_blocks - 1) * self.block_stride_bytes + p.page_size_bytes
                             for p in placements)
        # Blocks must not share pages; checked exactly up to 2**24 pages, else on the first and last blocks.
        probe = (np.arange(self.num_blocks) if self.num_blocks * self.pages_per_block <= 1 << 24
                 else np.unique([0, 1, self.num_blocks - 2, self.num_blocks - 1]).clip(0, self.num_blocks - 1))
        probe_pages = self.pages(probe)
        if np.unique(probe_pages).size != probe_pages.size:
            raise VmemInvalidArgument("blocks share pages: the block stride is smaller than a block")

    def pages(self, block_ids) -> np.ndarray:
        """Virtual pages of ``block_ids`` ([n] ints): [n * pages_per_block] int64, block by block."""
        ids = np.asarray(block_ids, dtype=np.int64).reshape(-1, 1)
        return (ids * self.stride_pages + self.base_pages).reshape(-1)
