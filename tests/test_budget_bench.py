"""bench/multi_tenant.py end to end, small (slow: two engines in two processes, both modes, ~1-2 min)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_multi_tenant_bench_small(tmp_path):
    out = tmp_path / "mt.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "multi_tenant.py"), "--bursts", "1", "--phase-s", "4",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    elastic = report["modes"]["elastic"]
    assert elastic["samples"] > 100
    assert elastic["samples_over_budget"] == 0 and elastic["samples_over_budget_os"] == 0
    assert elastic["flow_back_max_s"] is not None and elastic["flow_back_max_s"] < 1.0
    assert all(t["finished"] == t["requests"] for t in elastic["tenants"].values())
    assert out.with_suffix(".png").stat().st_size > 10_000
