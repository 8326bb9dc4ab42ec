"""bench/native_map.py stays runnable: a tiny run writes JSON with every mode and a PNG."""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_native_map_bench_tiny(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import native_map
    finally:
        sys.path.pop(0)
    out = tmp_path / "nm.json"
    native_map.main(["--scale", "0.005", "--repeats", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert (tmp_path / "nm.png").stat().st_size > 0
    assert [r["page_bytes"] for r in report["results"]] == [4096, 65536, 2 << 20]
    for r in report["results"]:
        assert set(r["modes"]) == {"raw", "batched", "per_call", "contiguous", "async"}
        assert r["map_runs_per_mode"]["contiguous"] == 1
        assert r["map_runs_per_mode"]["batched"] == r["num_pages"]
        assert all(m["map_ns_per_page"] > 0 for m in r["modes"].values())
