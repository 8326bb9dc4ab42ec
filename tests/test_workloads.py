"""Trace loaders, scaling knobs and the seeded generator."""

import numpy as np
import pytest

from vmem.engine import workloads as wl
from vmem.errors import VmemInvalidArgument


@pytest.fixture(scope="module")
def azure():
    return wl.load_trace()


def test_bundled_azure_trace_parses(azure):
    assert len(azure) == 19366
    assert azure[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(azure, azure[1:]))
    s = wl.summarize(azure)
    assert 3490 < s["span_s"] < 3510
    assert 5.4 < s["rate_per_s"] < 5.7
    assert 1.0 < s["interarrival_cv"] < 1.2
    assert 1100 < s["prompt_tokens"]["mean"] < 1200 and s["prompt_tokens"]["max"] == 14050
    assert 200 < s["output_tokens"]["mean"] < 220 and s["output_tokens"]["max"] == 1000
    assert s["failure_fraction"] == 0.0
    # fractional seconds are kept (7 digits in the CSV)
    assert azure[1].arrival_s == pytest.approx(4.314579, abs=1e-5)


def test_generator_matches_rate_and_cv():
    reqs = wl.generate(20000, rate=4.0, cv=2.0, seed=7)
    s = wl.summarize(reqs)
    assert s["rate_per_s"] == pytest.approx(4.0, rel=0.05)
    assert s["interarrival_cv"] == pytest.approx(2.0, rel=0.07)
    poisson = wl.summarize(wl.generate(20000, rate=10.0, cv=1.0, seed=8))
    assert poisson["interarrival_cv"] == pytest.approx(1.0, rel=0.05)


def test_generator_is_seeded_and_bounded():
    kw = dict(rate=2.0, cv=1.5, prompt_lengths=wl.ZipfLengths(1.1, 8, 300),
              output_lengths=wl.ZipfLengths(0.8, 4, 100), failure_fraction=0.1)
    a, b = wl.generate(3000, seed=1, **kw), wl.generate(3000, seed=1, **kw)
    assert a == b and a != wl.generate(3000, seed=2, **kw)
    assert all(8 <= r.prompt_tokens <= 300 for r in a)
    ok = [r.output_tokens for r in a if r.output_tokens]
    assert min(ok) >= 4 and max(ok) <= 100
    assert wl.summarize(a)["failure_fraction"] == pytest.approx(0.1, abs=0.02)
    # Zipf: the smallest length is the most frequent and the median is far below the mean of the range
    p = np.array([r.prompt_tokens for r in a])
    assert np.median(p) < 60 and (p == 8).sum() > (p == 9).sum()


def test_empirical_lengths_follow_the_trace(azure):
    dist = wl.EmpiricalLengths.from_trace(azure, "output_tokens")
    sample = dist.sample(np.random.default_rng(0), 20000)
    true = np.array([r.output_tokens for r in azure])
    assert set(np.unique(sample)) <= set(np.unique(true))
    for q in (50, 90):
        assert np.percentile(sample, q) == pytest.approx(np.percentile(true, q), rel=0.05)


def test_burstgpt_roundtrip(tmp_path):
    reqs = wl.generate(200, rate=3.0, cv=1.2, failure_fraction=0.2, seed=3)
    path = tmp_path / "synthetic.csv"
    wl.write_burstgpt_csv(reqs, path)
    back = wl.load_trace(path, include_failures=True)
    assert [(r.prompt_tokens, r.output_tokens) for r in back] == [(r.prompt_tokens, r.output_tokens) for r in reqs]
    assert [r.arrival_s for r in back] == pytest.approx([r.arrival_s for r in reqs], abs=1e-5)
    dropped = wl.load_burstgpt_csv(path)
    assert len(dropped) == sum(1 for r in reqs if r.output_tokens) and all(r.output_tokens for r in dropped)
    assert wl.load_burstgpt_csv(path, model="GPT-4") == []


def test_scale_trace_window_rate_and_lengths(azure):
    cut = wl.scale_trace(azure, start_s=100, duration_s=60, rate=2.0, length_scale=0.125,
                         max_prompt_tokens=256, max_output_tokens=64)
    src = [r for r in azure if 100 <= r.arrival_s < 160]
    assert len(cut) == len(src) and cut[0].arrival_s == 0.0
    assert wl.summarize(cut)["rate_per_s"] == pytest.approx(2.0, rel=1e-6)
    assert all(1 <= r.prompt_tokens <= 256 and 1 <= r.output_tokens <= 64 for r in cut)
    assert cut[0].prompt_tokens == min(256, max(1, round(src[0].prompt_tokens / 8)))
    fast = wl.scale_trace(azure, max_requests=10, time_scale=0.5)
    assert [r.arrival_s for r in fast] == pytest.approx([r.arrival_s / 2 for r in azure[:10]])


def test_bad_input_is_a_typed_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,abc,3\n")
    with pytest.raises(VmemInvalidArgument, match="bad.csv:2"):
        wl.load_trace(bad)
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(VmemInvalidArgument, match="unknown trace format"):
        wl.load_trace(other)
    with pytest.raises(VmemInvalidArgument):
        wl.load_trace(tmp_path / "missing.csv")
    with pytest.raises(VmemInvalidArgument):
        wl.generate(10, rate=0)
    with pytest.raises(VmemInvalidArgument):
        wl.generate(10, failure_fraction=1.5)
    with pytest.raises(VmemInvalidArgument):
        wl.scale_trace([], time_scale=0)
