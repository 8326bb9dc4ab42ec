"""Serving metrics as `vllm bench serve` defines them."""

import pytest

from vmem.engine.metrics import RequestRecord, compute_metrics, summarize_ms
from vmem.errors import VmemInvalidArgument


def test_per_request_definitions():
    r = RequestRecord("a", arrival_time=10.0, num_prompt_tokens=5, token_times=[10.5, 10.7, 11.0, 11.1],
                      finish_reason="length")
    assert r.ttft == pytest.approx(0.5)
    assert r.e2el == pytest.approx(1.1)
    assert r.tpot == pytest.approx((1.1 - 0.5) / 3)
    assert r.itls == pytest.approx([0.2, 0.3, 0.1])
    one = RequestRecord("b", 0.0, 3, [0.25], "stop")
    assert one.tpot is None and one.itls == []


def test_aggregate_metrics_and_goodput():
    recs = [RequestRecord("a", 0.0, 10, [1.0, 1.5, 2.0], "length"),
            RequestRecord("b", 0.5, 20, [3.0, 3.1], "stop"),
            RequestRecord("c", 1.0, 7, [], "error")]
    m = compute_metrics(recs, duration_s=4.0, slos_ms={"ttft": 1500})
    assert (m["completed"], m["failed"], m["num_requests"]) == (2, 1, 3)
    assert m["total_output_tokens"] == 5 and m["total_input_tokens"] == 30
    assert m["output_throughput"] == pytest.approx(5 / 4)
    assert m["request_throughput"] == pytest.approx(0.5)
    assert m["ttft_ms"]["mean"] == pytest.approx((1000 + 2500) / 2)
    assert m["tpot_ms"]["median"] == pytest.approx((500 + 100) / 2)
    assert m["itl_ms"]["p50"] == pytest.approx(500)
    assert m["e2el_ms"]["p99"] == pytest.approx(2000 + 0.99 * 600)
    assert m["concurrency"] == pytest.approx((2.0 + 2.6) / 4)
    assert m["goodput"] == pytest.approx(1 / 4)     # only "a" meets TTFT <= 1.5 s
    with pytest.raises(VmemInvalidArgument):
        compute_metrics(recs, 1.0, slos_ms={"latency": 1})


def test_empty_summary_is_zero():
    assert summarize_ms([])["p99"] == 0.0
    assert compute_metrics([], 1.0)["output_throughput"] == 0.0
