"""The `vmem` command: info, replay --compare on a tiny slice of the bundled trace, argument errors."""

import json
import subprocess
import sys

import pytest

from vmem.cli import machine_info, main


def test_info_reports_backend_and_limits(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] in ("host", "cuda")
    assert info["granularity_bytes"] > 0 and info["granularity_bytes"] % 4096 == 0
    assert info["vm.max_map_count"] > 0 and info["process_mappings_in_use"] > 0
    assert isinstance(info["cuda_available"], bool)
    assert main(["info"]) == 0
    assert "granularity_bytes" in capsys.readouterr().out


def test_info_names_an_unavailable_backend():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    info = machine_info("cuda")
    assert info["backend"] is None and "Vmem" in info["backend_error"]


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["replay", "--cache", "nonsense"])
    assert e.value.code == 2
    assert main([]) == 2


@pytest.mark.parametrize("slo", ["ttft", "latency:3", "ttft:fast"])
def test_replay_rejects_bad_goodput_slos(capsys, slo):
    assert main(["replay", "--goodput", slo, "--no-progress"]) == 1
    assert "--goodput" in capsys.readouterr().err


def test_replay_rejects_an_empty_window(capsys, tmp_path):
    rc = main(["replay", "--start", "1e9", "--json", str(tmp_path / "r.json"), "--png", str(tmp_path / "r.png"),
               "--no-progress"])
    assert rc == 1 and "no requests" in capsys.readouterr().err


def test_replay_compare_smoke(tmp_path):
    """A few seconds of the bundled trace through vmem, paged and static on the same budget."""
    out_json, out_png = tmp_path / "replay.json", tmp_path / "replay.png"
    cmd = [sys.executable, "-m", "vmem", "replay", "--compare", "--model", "tiny", "--max-requests", "12", "--rate", "50",
           "--max-batch", "16", "--max-seq-len", "256", "--max-prompt-tokens", "128", "--max-output-tokens", "24",
           "--goodput", "ttft:60000", "--json", str(out_json), "--png", str(out_png), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "output tok/s" in proc.stdout and "goodput" in proc.stdout and str(out_png) in proc.stdout
    assert out_png.stat().st_size > 10_000
    result = json.loads(out_json.read_text())
    assert result["workload"]["num_requests"] == 12
    runs = result["runs"]
    assert set(runs) == {"vmem", "paged", "static"}
    tokens = {k: r["metrics"]["total_output_tokens"] for k, r in runs.items()}
    assert len(set(tokens.values())) == 1 and tokens["vmem"] > 0      # same requests, all served
    for kind, r in runs.items():
        m = r["metrics"]
        assert m["completed"] == 12 and m["failed"] == 0, kind
        assert m["goodput"] == pytest.approx(m["request_throughput"])     # a 60 s TTFT SLO: all good
        assert m["output_throughput"] > 0 and 0 < m["ttft_ms"]["p50"] <= m["e2el_ms"]["p99"]
        assert 1 <= r["peak_running"] <= 16
        assert len(r["timeline"]["t_s"]) == len(r["timeline"]["physical_kv_bytes"]) > 0
    # same budget: static holds max_batch // 8 = 2 full-length slots, vmem and paged pack more requests
    assert runs["static"]["peak_running"] == 2
    assert runs["vmem"]["peak_running"] > 2 and runs["paged"]["peak_running"] > 2
    assert runs["vmem"]["map_calls"] > 0 and runs["static"]["map_calls"] == 0
    assert result["memory_bytes"] == 2 * 256 * 512          # tiny model: 512 bytes of K/V per token
    assert all(0 < r["peak_physical_kv_bytes"] <= result["memory_bytes"] for r in runs.values())


@pytest.mark.parametrize("command", ["serve", "stress"])
def test_serve_and_stress_are_wired(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and ("vmem " + command) in capsys.readouterr().out


def test_replay_paces_arrivals_at_a_multiple_of_measured_static_capacity():
    from vmem.replay import ReplayConfig, replay
    cfg = ReplayConfig(model="tiny", max_requests=16, max_batch=8, max_seq_len=256, max_prompt_tokens=96, max_output_tokens=16,
                       arrivals="paced", load=1.5)
    result = replay(cfg, kinds=("vmem",), progress=False)
    cal = result["calibration"]
    assert cal["static_capacity_req_s"] > 0 and cal["rate"] == pytest.approx(1.5 * cal["static_capacity_req_s"])
    assert result["workload"]["rate_per_s"] == pytest.approx(cal["rate"], rel=1e-6)
    assert result["runs"]["vmem"]["metrics"]["completed"] == 16


def test_replay_default_is_a_saturating_burst_where_vmem_fits_more_than_static():
    # The demo's default: every request waits at t=0, so each cache runs at saturation and the table
    # shows what the shared budget holds at once (static: max_batch // 8 full-length slots).
    from vmem.replay import ReplayConfig, replay
    cfg = ReplayConfig(model="tiny", max_requests=24, max_batch=16, max_seq_len=256, max_prompt_tokens=96, max_output_tokens=16)
    assert cfg.arrivals == "burst"
    assert all(r.arrival_s == 0.0 for r in cfg.requests())
    result = replay(cfg, kinds=("vmem", "static"), progress=False)
    assert result["calibration"] is None
    runs = result["runs"]
    assert runs["static"]["peak_running"] == 2 and runs["vmem"]["peak_running"] > 2
    assert result["ratios"]["static"]["mean_running"] > 1.0
    assert all(r["metrics"]["completed"] == 24 for r in runs.values())


def test_replay_without_matplotlib_still_reports(tmp_path):
    # matplotlib is the optional `bench` extra: without it the run ends with its table, and one line
    # says how to get the figure.
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'matplotlib':\n"
            "            raise ImportError('No module named matplotlib (blocked)')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from vmem.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    cmd = [sys.executable, "-c", code, "replay", "--cache", "vmem", "--model", "tiny", "--max-requests", "4", "--max-batch", "8",
           "--max-seq-len", "128", "--max-prompt-tokens", "32", "--max-output-tokens", "4",
           "--json", str(tmp_path / "r.json"), "--png", str(tmp_path / "r.png"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "output tok/s" in proc.stdout and "vmem[bench]" in proc.stdout and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["runs"]["vmem"]["metrics"]["completed"] == 4
    assert not (tmp_path / "r.png").exists()


USAGE_ERRORS = [
    # (argv, the flag the one-line message names)
    (["serve", "--max-queued", "0"], "--max-queued"), (["serve", "--max-queued", "-1"], "--max-queued"),
    (["serve", "--max-tokens", "0"], "--max-tokens"), (["serve", "--max-prompt-tokens", "0"], "--max-prompt-tokens"),
    (["serve", "--max-prompt-tokens", "-5"], "--max-prompt-tokens"), (["serve", "--max-batch", "0"], "--max-batch"),
    (["serve", "--port", "99999"], "--port"), (["serve", "--port", "0"], "--port"), (["serve", "--port", "x"], "--port"),
    (["serve", "--log-level", "nonsense"], "--log-level"), (["serve", "--memory", "0"], "--memory"),
    (["serve", "--memory", "-1G"], "--memory"), (["serve", "--torch-threads", "0"], "--torch-threads"),
    (["serve", "--max-body-bytes", "0"], "--max-body-bytes"), (["serve", "--header-timeout", "0"], "--header-timeout"),
    (["serve", "--body-timeout", "nan"], "--body-timeout"), (["serve", "--shutdown-timeout", "-1"], "--shutdown-timeout"),
    (["serve", "--max-connections", "0"], "--max-connections"), (["serve", "--api-key", ""], "--api-key"),
    (["stress", "--memory-mb", "nan"], "--memory-mb"), (["stress", "--memory-mb", "inf"], "--memory-mb"),
    (["stress", "--memory-mb", "0"], "--memory-mb"), (["stress", "--seconds", "nan"], "--seconds"),
    (["stress", "--fault-rate", "1.5"], "--fault-rate"), (["stress", "--max-ops", "-1"], "--max-ops"),
]


@pytest.mark.parametrize("argv,flag", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_flag_values_that_cannot_work_are_one_line_usage_errors(argv, flag, capsys):
    # Before: --max-queued 0 made a server that answered 429 to everything, 0 meant "no limit",
    # --port 99999 / --log-level nonsense / --memory-mb nan died with tracebacks.
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and flag in lines[0] and lines[0].startswith("vmem %s: error:" % argv[0]), captured.err
    assert captured.out == ""


def test_log_level_is_case_insensitive():
    from vmem.cli import build_parser
    assert build_parser().parse_args(["serve", "--log-level", "WARNING"]).log_level == "warning"


# A base install (no `server` extra): FastAPI, Starlette, uvicorn and pydantic cannot be imported.
_WITHOUT_SERVER_EXTRA = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("fastapi", "starlette", "uvicorn", "pydantic"):
            raise ModuleNotFoundError("No module named %r" % name, name=name)
        return None
sys.meta_path.insert(0, Blocker())
from vmem.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_without_the_server_extra_is_one_line_and_exit_2():
    p = subprocess.run([sys.executable, "-c", _WITHOUT_SERVER_EXTRA, "serve", "--port", "8123"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and "pip install 'vmem[server]'" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    # --help needs no extra: the flags live in vmem/cli.py
    h = subprocess.run([sys.executable, "-c", _WITHOUT_SERVER_EXTRA, "serve", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert h.returncode == 0 and "--max-body-bytes" in h.stdout and "--api-key" in h.stdout, h.stderr


def test_cli_choices_are_the_librarys():
    # the CLI spells its choices out (no torch at start-up); they must not drift from the library's
    import vmem.cli as cli
    from vmem.allocator import CACHE_KINDS
    from vmem.replay import ARRIVALS

    assert cli.CACHE_KINDS == CACHE_KINDS and cli.ARRIVALS == ARRIVALS
    from vmem.backends import get_backend
    from vmem.errors import VmemUnsupported
    for name in cli.BACKENDS:
        try:
            get_backend(name)
        except VmemUnsupported:             # cuda without a device: refused, yet a name it knows
            pass
