"""Two `vmem serve` processes sharing one KV budget (--kv-budget), driven by the official openai client."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from test_server import _free_port, parse_prometheus  # noqa: E402
from conftest import wait_for_server  # noqa: E402

MEMORY = 16 << 20


def _serve(budget: str, port: int, *extra: str):
    cmd = [sys.executable, "-m", "vmem", "serve", "--model", "tiny", "--max-batch", "4", "--max-seq-len", "256",
           "--backend", "host", "--port", str(port), "--log-level", "warning", "--torch-threads", "1",
           "--kv-budget", budget, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_up(proc, url: str) -> None:
    wait_for_server(proc, url)


def _gauge(url: str, name: str) -> float:
    return parse_prometheus(httpx.get(url + "/metrics", timeout=10).text)[(name, ())]


def _until(fn, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while not fn():
        assert time.monotonic() < deadline, "condition not met in %.1f s" % timeout_s
        time.sleep(0.05)
    return time.monotonic()


def test_two_servers_share_one_kv_budget(tmp_path):
    budget = str(tmp_path / "kv")
    pa, pb = _free_port(), _free_port()
    a = _serve(budget, pa, "--memory", str(MEMORY))              # whichever comes first creates it,
    b = _serve(budget, pb, "--memory", str(MEMORY))              # the other joins it
    ua, ub = "http://127.0.0.1:%d" % pa, "http://127.0.0.1:%d" % pb
    try:
        _wait_up(a, ua)
        _wait_up(b, ub)
        limit = _gauge(ua, "vmem_kv_budget_limit_pages")
        assert limit == _gauge(ub, "vmem_kv_budget_limit_pages") > 0
        client_a = openai.OpenAI(base_url=ua + "/v1", api_key="unused", max_retries=0, timeout=60)
        client_b = openai.OpenAI(base_url=ub + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert client_a.completions.create(model="tiny", prompt="hello " * 20, max_tokens=8).usage.completion_tokens
        # B streams a long request: A sees B's pages in the budget's total, and holds none itself once idle
        stream = client_b.completions.create(model="tiny", prompt="x" * 150, max_tokens=100, stream=True,
                                             extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)
        b_held = _gauge(ub, "vmem_kv_budget_held_pages")
        assert b_held > 0
        _until(lambda: _gauge(ua, "vmem_kv_budget_held_pages") == 0, 5.0)
        assert _gauge(ua, "vmem_kv_budget_total_held_pages") >= b_held
        for _ in chunks:
            pass
        idle_from = time.monotonic()
        back = _until(lambda: _gauge(ub, "vmem_kv_budget_total_held_pages") == 0, 5.0)
        assert back - idle_from < 2.0                            # idle_release_s 0.5 + loop ticks + scrapes
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def test_joining_a_missing_budget_is_a_usage_error(tmp_path, capsys):
    from vmem.cli import main

    assert main(["serve", "--model", "tiny", "--backend", "host", "--kv-budget", str(tmp_path / "none")]) == 2
    assert "no such budget" in capsys.readouterr().err
    assert main(["serve", "--cache", "paged", "--kv-budget", str(tmp_path / "kv"), "--memory", "1M"]) == 2
    assert "needs --cache vmem" in capsys.readouterr().err
