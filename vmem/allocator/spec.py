"""KVCacheSpec: the shape of a KV cache and every piece of layout arithmetic.

Everything that turns tokens into pages or pages into byte offsets lives here, so the
cache, the baselines, the benchmarks and the tests agree by construction.

Glossary (one place for layouts):

    plane      one contiguous tensor of the reservation: the K or the V of one layer
               (NHD, HND) or of one layer group (GROUPED). Planes are laid out
               ``[group0.K, group0.V, group1.K, group1.V, ...]``.
    row        the bytes of one request slot in one plane (NHD, GROUPED), or of one slot
               and one KV head (HND). Every row starts on a page boundary.
    column     page ``j`` of every row of a slot. A slot always has the same number of
               mapped columns in all its rows, so slots grow and shrink by columns.

    layout    plane shape                                  row = one slot ...      kv(layer) view
    NHD       [max_batch, S_pad, Hkv, D]                   in one plane            [B, S, Hkv, D]
    HND       [max_batch, Hkv, S_pad, D]                   and one head            [B, Hkv, S, D]
    GROUPED   [max_batch, S_pad, group, Hkv, D]            in one plane            [B, S, Hkv, D] (strided)

``S_pad = padded_max_seq_len`` is ``max_seq_len`` rounded up so that a row is a whole
number of pages; views expose only the first ``max_seq_len`` tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch

from vmem.errors import VmemInvalidArgument

LAYOUTS = ("NHD", "HND", "GROUPED")

# A single host reservation of 85 TiB was measured to work; GPUs expose 47-49 bits.
MAX_RESERVATION_BYTES = 64 << 40
# The page table keeps one int32 per virtual page.
MAX_VIRTUAL_PAGES = 1 << 27


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    """Shape of a KV cache: model geometry, request limits, page size and layout.

    Validated on construction (VmemInvalidArgument). ``layer_group_size`` is used only by the
    GROUPED layout (vAttention's MegaCache) and must divide ``num_layers``.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float16
    max_batch: int = 8
    max_seq_len: int = 4096
    page_bytes: int = 65536
    layout: str = "NHD"
    layer_group_size: int = 1

    @classmethod
    def for_model(cls, config, *, max_batch: int = 8, max_seq_len: int | None = None, **overrides) -> "KVCacheSpec":
        """The spec of a model's KV cache: num_layers, num_kv_heads, head_dim and dtype read from
        ``config`` (any object with those attributes, e.g. vmem.engine.ModelConfig); max_seq_len defaults
        to ``config.max_position``; ``overrides`` (page_bytes, layout, layer_group_size...) as in the
        constructor. Keeps the allocator free of engine imports."""
        for name in ("num_layers", "num_kv_heads", "head_dim", "dtype"):
            if not hasattr(config, name):
                raise VmemInvalidArgument("KVCacheSpec.for_model: the config has no %r" % name)
        if max_seq_len is None:
            max_seq_len = getattr(config, "max_position", None)
        fields = dict(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                      dtype=config.dtype, max_batch=max_batch, max_seq_len=max_seq_len)
        fields.update(overrides)
        return cls(**fields)

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "max_batch", "max_seq_len", "page_bytes",
                     "layer_group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise VmemInvalidArgument("KVCacheSpec.%s must be a positive int, got %r" % (name, value))
            # a Python int: products of numpy int32 fields wrapped (a 0-byte reservation)
            object.__setattr__(self, name, int(value))
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:   # float8 types included
            raise VmemInvalidArgument("KVCacheSpec.dtype must be a floating torch dtype, got %r" % (self.dtype,))
        if self.layout not in LAYOUTS:
            raise VmemInvalidArgument("KVCacheSpec.layout must be one of %s, got %r" % (LAYOUTS, self.layout))
        if self.layout != "GROUPED" and self.layer_group_size != 1:
            raise VmemInvalidArgument("layer_group_size=%d needs layout='GROUPED'" % self.layer_group_size)
        if self.num_layers % self.layer_group_size:
            raise VmemInvalidArgument("layer_group_size=%d must divide num_layers=%d"
                                      % (self.layer_group_size, self.num_layers))
        if self.reservation_bytes > MAX_RESERVATION_BYTES:
            raise VmemInvalidArgument(
                "the cache needs %.1f TiB of virtual address space (%d planes x %d slots x %d bytes per slot "
                "row); the limit is %d TiB: lower max_batch or max_seq_len"
                % (self.reservation_bytes / 2**40, self.num_planes, self.max_batch, self.slot_plane_bytes,
                   MAX_RESERVATION_BYTES >> 40))
        if self.num_virtual_pages > MAX_VIRTUAL_PAGES:
            raise VmemInvalidArgument(
                "the cache spans %d virtual pages (limit %d): use bigger pages than %d bytes"
                % (self.num_virtual_pages, MAX_VIRTUAL_PAGES, self.page_bytes))

    # ---- geometry -------------------------------------------------------------------------
    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @functools.cached_property
    def num_groups(self) -> int:
        """Tensors per K (or V): one per layer, or one per layer group (GROUPED)."""
        return self.num_layers // self.layer_group_size

    @functools.cached_property
    def num_planes(self) -> int:
        return 2 * self.num_groups

    @functools.cached_property
    def rows_per_plane(self) -> int:
        """Rows one slot owns in a plane: one per KV head in HND, else one."""
        return self.num_kv_heads if self.layout == "HND" else 1

    @functools.cached_property
    def rows_per_slot(self) -> int:
        return self.num_planes * self.rows_per_plane

    @functools.cached_property
    def row_token_bytes(self) -> int:
        """Bytes one token occupies in one row."""
        per_head = self.head_dim * self.itemsize
        if self.layout == "HND":
            return per_head
        return self.layer_group_size * self.num_kv_heads * per_head

    @functools.cached_property
    def token_bytes(self) -> int:
        """Bytes of K and V of one token over all layers (what a token really costs)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.itemsize

    @functools.cached_property
    def padded_max_seq_len(self) -> int:
        """max_seq_len rounded up so a row is a whole number of pages (rows start on page boundaries)."""
        quantum = self.page_bytes // math.gcd(self.page_bytes, self.row_token_bytes)
        return -(-self.max_seq_len // quantum) * quantum

    @functools.cached_property
    def row_bytes(self) -> int:
        return self.padded_max_seq_len * self.row_token_bytes

    @functools.cached_property
    def pages_per_row(self) -> int:
        return self.row_bytes // self.page_bytes

    @functools.cached_property
    def slot_plane_bytes(self) -> int:
        return self.rows_per_plane * self.row_bytes

    @functools.cached_property
    def plane_bytes(self) -> int:
        return self.max_batch * self.slot_plane_bytes

    @functools.cached_property
    def reservation_bytes(self) -> int:
        return self.num_planes * self.plane_bytes

    @functools.cached_property
    def num_virtual_pages(self) -> int:
        return self.reservation_bytes // self.page_bytes

    @property
    def tokens_per_page(self) -> float:
        """Tokens one page holds in one row (a float when tokens straddle page boundaries)."""
        q, r = divmod(self.page_bytes, self.row_token_bytes)
        return q if r == 0 else self.page_bytes / self.row_token_bytes

    @functools.cached_property
    def slot_pages(self) -> int:
        """Pages of one fully mapped slot."""
        return self.rows_per_slot * self.pages_per_row

    @functools.cached_property
    def plane_shape(self) -> tuple[int, ...]:
        b, s, h, d = self.max_batch, self.padded_max_seq_len, self.num_kv_heads, self.head_dim
        if self.layout == "NHD":
            return (b, s, h, d)
        if self.layout == "HND":
            return (b, h, s, d)
        return (b, s, self.layer_group_size, h, d)

    # ---- tokens -> pages ------------------------------------------------------------------
    def row_pages_for_tokens(self, num_tokens: int) -> int:
        """Pages (columns) one row needs to hold tokens [0, num_tokens).

        ::

            row:    | page 0          | page 1          | page 2          | ...
            bytes:  [0, P)            [P, 2P)           [2P, 3P)
            tokens: [0, n) covers bytes [0, n * row_token_bytes)  ->  ceil(n * row_token_bytes / P) pages

        A token may straddle two pages when P is not a multiple of row_token_bytes; both count.
        """
        return -(-int(num_tokens) * self.row_token_bytes // self.page_bytes)

    def pages_for_tokens(self, num_tokens: int) -> int:
        """Pages one slot needs (all planes, all rows) to hold tokens [0, num_tokens)."""
        return self.rows_per_slot * self.row_pages_for_tokens(num_tokens)

    def row_pages_for_tokens_array(self, num_tokens: np.ndarray) -> np.ndarray:
        """Vectorised row_pages_for_tokens: int64 array in, int64 array out."""
        return -(-np.asarray(num_tokens, dtype=np.int64) * self.row_token_bytes // self.page_bytes)

    # ---- pages -> virtual addresses -------------------------------------------------------
    def virtual_page(self, plane: int, slot: int, row: int, column: int) -> int:
        """Index of a page in the reservation (byte offset = index * page_bytes).

        ::

            reservation = [plane 0 | plane 1 | ... ]                       num_planes planes
            plane p     = [slot 0 | slot 1 | ... ]                         max_batch slots, slot_plane_bytes each
            slot s      = [row 0 | row 1 | ... ]                           rows_per_plane rows, row_bytes each
            row r       = [page 0 | page 1 | ... ]                         pages_per_row pages
            index       = ((p * max_batch + s) * rows_per_plane + r) * pages_per_row + column
        """
        return ((plane * self.max_batch + slot) * self.rows_per_plane + row) * self.pages_per_row + column

    def slot_row_starts(self, slot: int) -> np.ndarray:
        """Virtual page index of column 0 of each of the slot's rows: [rows_per_slot] int64.

        Row order is (plane, row-in-plane), the order the page table stores them in.
        """
        planes = np.arange(self.num_planes, dtype=np.int64)[:, None]
        rows = np.arange(self.rows_per_plane, dtype=np.int64)[None, :]
        starts = ((planes * self.max_batch + slot) * self.rows_per_plane + rows) * self.pages_per_row
        return starts.reshape(-1)

    def slot_virtual_pages(self, slot: int, first_column: int, end_column: int) -> np.ndarray:
        """Virtual pages of columns [first_column, end_column) of every row of a slot.

        Returns [rows_per_slot, end_column - first_column] int64, row-major, so each row's
        pages are adjacent (and merge into one OS mapping when their physical pages are too).
        """
        columns = np.arange(first_column, end_column, dtype=np.int64)[None, :]
        return self.slot_row_starts(slot)[:, None] + columns

    def plane_offset_bytes(self, plane: int) -> int:
        return plane * self.plane_bytes

    def layer_plane(self, layer: int) -> tuple[int, int]:
        """(K plane index, index of the layer inside its group) for a layer."""
        group, within = divmod(layer, self.layer_group_size)
        return 2 * group, within

    def check_layer(self, layer) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise VmemInvalidArgument("layer must be in [0, %d), got %r" % (self.num_layers, layer))
        return int(layer)

    def check_num_tokens(self, num_tokens) -> int:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)):
            raise VmemInvalidArgument("a token count must be an int, got %r" % (num_tokens,))
        if not 0 <= num_tokens <= self.max_seq_len:
            raise VmemInvalidArgument("token count %d is outside [0, max_seq_len=%d]"
                                      % (num_tokens, self.max_seq_len))
        return int(num_tokens)

    def layer_views(self, planes: list[torch.Tensor], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V views of one layer over plane tensors shaped ``plane_shape``.

        NHD: ``[max_batch, max_seq_len, Hkv, D]``; HND: ``[max_batch, Hkv, max_seq_len, D]``;
        GROUPED: ``[max_batch, max_seq_len, Hkv, D]`` strided over the group dimension. Zero-copy.
        """
        layer = self.check_layer(layer)
        plane, within = self.layer_plane(layer)
        s = self.max_seq_len
        out = []
        for t in (planes[plane], planes[plane + 1]):
            if self.layout == "NHD":
                out.append(t[:, :s])
            elif self.layout == "HND":
                out.append(t[:, :, :s])
            else:
                out.append(t[:, :s, within])
        return out[0], out[1]

    @property
    def kv_layout(self) -> str:
        """What attention kernels are told: GROUPED views are (strided) NHD."""
        return "HND" if self.layout == "HND" else "NHD"

    def describe(self) -> dict:
        return {
            "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "dtype": str(self.dtype).replace("torch.", ""), "max_batch": self.max_batch,
            "max_seq_len": self.max_seq_len, "padded_max_seq_len": self.padded_max_seq_len,
            "page_bytes": self.page_bytes, "layout": self.layout, "layer_group_size": self.layer_group_size,
            "tokens_per_page": self.tokens_per_page, "reservation_bytes": self.reservation_bytes,
        }
