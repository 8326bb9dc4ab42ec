"""The stress harness (python -m vmem.stress / vmem stress): it runs, survives faults, and notices loss."""

import json
import subprocess
import sys

import pytest

from vmem import stress
from vmem.cli import build_parser

SMALL = ["--layers", "2", "--kv-heads", "2", "--head-dim", "32", "--max-batch", "8", "--max-seq-len", "1024",
         "--page-bytes", "8192", "--memory-mb", "2", "--backend", "host", "--fault-rate", "0.2"]


@pytest.mark.parametrize("extra", [[], ["--async", "--layout", "HND", "--reclaim", "eager"],
                                   ["--layout", "GROUPED", "--group", "2"]])
def test_stress_runs_clean(extra, tmp_path):
    out = tmp_path / "report.json"
    rc = stress.main(SMALL + ["--seconds", "120", "--max-ops", "250", "--json", str(out)] + extra)
    report = json.loads(out.read_text())
    assert rc == 0 and report["ok"]
    assert report["lost"] == 0 and report["integrity_failures"] == 0
    assert report["ops"] == 250 and report["steps"] > 0
    assert report["faults_injected"] > 0 and report["failures_survived"] > 0
    assert report["out_of_memory"] > 0                 # 2 MiB is tight: the OOM path ran too
    assert report["peak_os_mappings"] <= report["map_budget"]


def test_stress_notices_lost_data():
    args = build_parser().parse_args(["stress", *SMALL, "--fault-rate", "0"])
    s = stress.Stress(args)
    while not any(s.probes.values()):
        s.one_op()
    slot = next(slot for slot, probes in s.probes.items() if probes)
    k, _ = s.cache.kv(0)
    token = s.probes[slot][0]
    (k[slot, :, token] if s.spec.layout == "HND" else k[slot, token]).fill_(-1.0)
    s.check()
    assert s.counts["lost"] == 1
    assert s.run()["ok"] is False


def test_python_dash_m_entry_point():
    p = subprocess.run([sys.executable, "-m", "vmem.stress", "--seconds", "120", "--max-ops", "30"] + SMALL,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ok"] is True


def test_a_configuration_vmem_refuses_is_a_message_not_a_traceback(capsys):
    assert stress.main(["--max-seq-len", "0", "--seconds", "1"]) == 2
    err = capsys.readouterr().err
    assert "vmem stress:" in err and "max_seq_len" in err and "Traceback" not in err
