"""KVCacheSpec: layout arithmetic, padding, validation."""

import numpy as np
import pytest
import torch

from vmem.allocator.spec import KVCacheSpec
from vmem.errors import VmemInvalidArgument


def spec(**kw):
    base = dict(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.float16, max_batch=3, max_seq_len=1000,
                page_bytes=16384)
    base.update(kw)
    return KVCacheSpec(**base)


def test_nhd_geometry():
    s = spec()
    assert s.row_token_bytes == 2 * 64 * 2
    assert s.tokens_per_page == 64
    assert s.padded_max_seq_len == 1024             # rows start on page boundaries: 1000 -> 16 pages of 64
    assert s.pages_per_row == 16
    assert s.plane_shape == (3, 1024, 2, 64)
    assert s.num_planes == 8 and s.rows_per_slot == 8
    assert s.reservation_bytes == 8 * 3 * 1024 * 256
    assert s.num_virtual_pages * s.page_bytes == s.reservation_bytes
    assert s.token_bytes == 2 * 4 * 2 * 64 * 2


def test_hnd_and_grouped_geometry():
    h = spec(layout="HND")
    assert h.rows_per_plane == 2 and h.rows_per_slot == 16
    assert h.tokens_per_page == 128
    assert h.plane_shape == (3, 2, 1024, 64)
    g = spec(layout="GROUPED", layer_group_size=4)
    assert g.num_planes == 2 and g.rows_per_slot == 2
    assert g.tokens_per_page == 16
    assert g.plane_shape == (3, 1008, 4, 2, 64)       # 1000 rounded up to a multiple of 16 tokens
    assert g.layer_plane(3) == (0, 3)


@pytest.mark.parametrize("layout", ["NHD", "HND", "GROUPED"])
def test_pages_for_tokens_matches_bytes(layout):
    s = spec(layout=layout, layer_group_size=2 if layout == "GROUPED" else 1)
    for n in [0, 1, 63, 64, 65, 999, 1000]:
        cols = s.row_pages_for_tokens(n)
        assert cols * s.page_bytes >= n * s.row_token_bytes
        assert (cols - 1) * s.page_bytes < n * s.row_token_bytes or n == 0
        assert s.pages_for_tokens(n) == cols * s.rows_per_slot
    assert np.array_equal(s.row_pages_for_tokens_array([0, 1, 65]), [s.row_pages_for_tokens(n) for n in (0, 1, 65)])


def test_tokens_straddling_pages():
    s = spec(head_dim=96, page_bytes=4096)           # 384-byte tokens: 10.67 per page
    assert s.tokens_per_page == pytest.approx(4096 / 384)
    assert (s.padded_max_seq_len * s.row_token_bytes) % s.page_bytes == 0
    assert s.row_pages_for_tokens(11) == 2           # token 10 straddles pages 0 and 1


@pytest.mark.parametrize("layout", ["NHD", "HND", "GROUPED"])
def test_views_address_the_pages_the_math_names(layout):
    """kv(layer)[slot, token] lies in the virtual page spec.virtual_page() names (byte offsets agree)."""
    s = spec(layout=layout, layer_group_size=2 if layout == "GROUPED" else 1, max_seq_len=300)
    base = torch.zeros(s.reservation_bytes // 2, dtype=torch.float16)
    planes = [base[p * s.plane_bytes // 2:(p + 1) * s.plane_bytes // 2].view(s.plane_shape) for p in range(s.num_planes)]
    for layer in range(s.num_layers):
        k, v = s.layer_views(planes, layer)
        if layout == "HND":
            assert k.shape == (3, 2, 300, 64)
        else:
            assert k.shape == (3, 300, 2, 64)
        plane, within = s.layer_plane(layer)
        head_bytes = s.head_dim * 2
        for slot, token, head in [(0, 0, 0), (2, 299, 1), (1, 77, 0)]:
            if layout == "HND":
                row, in_row = head, token * s.row_token_bytes
                elems = k[slot, head, token], v[slot, head, token]
            else:
                row, in_row = 0, token * s.row_token_bytes + (within * s.num_kv_heads + head) * head_bytes
                elems = k[slot, token, head], v[slot, token, head]
            for kv_index, elem in enumerate(elems):
                offset = elem.data_ptr() - base.data_ptr()
                expected = s.virtual_page(plane + kv_index, slot, row, in_row // s.page_bytes)
                assert offset // s.page_bytes == expected
                assert offset % s.page_bytes == in_row % s.page_bytes
                rows = s.slot_virtual_pages(slot, 0, s.pages_per_row)
                assert expected in rows[(plane + kv_index) * s.rows_per_plane + row]


def test_slot_virtual_pages_rows_are_runs():
    s = spec(layout="HND")
    pages = s.slot_virtual_pages(1, 2, 5)
    assert pages.shape == (s.rows_per_slot, 3)
    assert np.all(np.diff(pages, axis=1) == 1)
    assert len(np.unique(pages)) == pages.size
    assert pages.min() >= 0 and pages.max() < s.num_virtual_pages


@pytest.mark.parametrize("kw", [
    dict(num_layers=0), dict(head_dim=-1), dict(max_batch=True), dict(max_seq_len=1.5), dict(layout="NDH"),
    dict(layer_group_size=2), dict(layout="GROUPED", layer_group_size=3), dict(dtype=torch.int32),
    dict(page_bytes=0),
])
def test_bad_specs_raise_typed_errors(kw):
    with pytest.raises(VmemInvalidArgument):
        spec(**kw)


def test_address_space_is_checked_before_reserving():
    with pytest.raises(VmemInvalidArgument, match="virtual address space"):
        spec(num_layers=128, num_kv_heads=64, head_dim=256, max_batch=4096, max_seq_len=1 << 20, page_bytes=2 << 20)


def test_token_count_checks():
    s = spec()
    assert s.check_num_tokens(1000) == 1000
    for bad in (-1, 1001, 2.0, True):
        with pytest.raises(VmemInvalidArgument):
            s.check_num_tokens(bad)
    with pytest.raises(VmemInvalidArgument):
        s.check_layer(4)


def test_spec_is_frozen_and_hashable():
    s = spec()
    with pytest.raises(Exception):
        s.max_batch = 9
    assert hash(s) == hash(spec())


def test_for_model_reads_a_model_configs_geometry():
    from vmem.engine.model import ModelConfig
    cfg = ModelConfig.preset("tiny")
    spec = KVCacheSpec.for_model(cfg, max_batch=3, page_bytes=4096)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype) == \
        (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype)
    assert spec.max_batch == 3 and spec.max_seq_len == cfg.max_position and spec.page_bytes == 4096
    assert spec.token_bytes == cfg.kv_bytes_per_token
    assert KVCacheSpec.for_model(cfg, max_seq_len=64, layout="HND").kv_layout == "HND"
    with pytest.raises(VmemInvalidArgument, match="the config has no 'num_layers'"):
        KVCacheSpec.for_model(object())


@pytest.mark.parametrize("kind", ["vmem", "paged", "static"])
@pytest.mark.parametrize("memory_bytes", [0, -1, 1.5, True, "1G"])
def test_every_manager_refuses_a_bad_memory_bytes_the_same_way(kind, memory_bytes):
    from vmem.allocator import make_cache
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=64, max_batch=2, max_seq_len=64, page_bytes=4096)
    with pytest.raises(VmemInvalidArgument, match="memory_bytes must be a positive int"):
        make_cache(kind, spec, memory_bytes=memory_bytes, backend="host")
