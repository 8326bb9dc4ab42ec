"""Shared fixtures, helpers and Hypothesis profiles.

Helpers (import them: ``from conftest import greedy_reference, vmas_in, wait_for_server``): the greedy
oracle (a full recompute without any cache), the kernel's count of VMAs over a reservation, and the wait
for a `vmem serve` subprocess to come up.

Profiles: ``ci`` (loaded by default: derandomized, no deadline, so a red run reproduces) and ``soak``
(many more examples, ``SOAK_EXAMPLES`` per test, random seeds). Pick one with ``HYPOTHESIS_PROFILE=soak``;
``make soak`` runs it in rounds for ``SOAK_SECONDS`` (.ci/soak).
"""
import os
import time

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=50, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "soak", deadline=None, max_examples=int(os.environ.get("SOAK_EXAMPLES", 2000)), print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def host_backend():
    """The shared host Backend."""
    from vmem.backends import get_backend

    return get_backend("host")


@pytest.fixture
def host_resv(host_backend):
    """A 64 MiB host reservation of 64 KiB pages (1024 pages), closed after the test."""
    r = host_backend.reserve(64 << 20, 64 << 10)
    yield r
    r.close()


@pytest.fixture
def host_pool(host_backend):
    """A host pool of 256 pages of 64 KiB, closed after the test."""
    p = host_backend.create_pool(64 << 10, 256)
    yield p
    p.close()


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for the module: the tiny model is faster and steadier so on a shared 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    """The tiny reference model with seed 0 (modules may override it)."""
    from vmem.engine.model import Model, ModelConfig

    return Model(ModelConfig.preset("tiny", seed=0))


def greedy_reference(model, prompt, max_tokens: int) -> list[int]:
    """The oracle: greedy tokens of a full recompute of the whole sequence at every step, no cache."""
    import torch

    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = model.forward_full(torch.tensor([ids], dtype=torch.int64))
            ids.append(int(torch.argmax(logits[0, -1])))
    return ids[len(prompt):]


def vmas_in(resv) -> int:
    """Kernel VMAs that overlap the reservation, read from /proc/self/maps."""
    lo, hi = resv.address, resv.address + resv.num_bytes
    n = 0
    with open("/proc/self/maps") as f:
        for line in f:
            a, b = (int(x, 16) for x in line.split()[0].split("-"))
            if a < hi and b > lo:
                n += 1
    return n


def wait_for_server(proc, url: str, timeout_s: float = 60.0) -> None:
    """Poll ``url``/health until a ``vmem serve`` subprocess answers 200; fail with its output if it died."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "vmem serve did not come up"
        time.sleep(0.1)


def _cuda_ok():
    try:
        from vmem.backends import cuda_available

        return cuda_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly where the cuda backend cannot run."""
    if any("gpu" in item.keywords for item in items) and not _cuda_ok():
        skip = pytest.mark.skip(reason="no CUDA driver/device for the cuda backend")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
