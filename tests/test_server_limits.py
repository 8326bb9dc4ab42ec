"""What a hostile or careless client can do to the server, tried with real sockets on loopback:
oversized and slow bodies, slow headers, too many connections, a missing API key, and the
`vmem serve` process shut down under load (driven by the official `openai` client).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from test_server import ENGINE_KW, MODEL, LiveServer, parse_prometheus  # noqa: E402
from vmem.engine.engine import build_engine  # noqa: E402
from vmem.errors import VmemInvalidArgument  # noqa: E402
from vmem.server.app import ServerLimits  # noqa: E402
from conftest import wait_for_server  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _port(live: LiveServer) -> int:
    return int(live.url.rsplit(":", 1)[1])


def _head(path: str, *lines: str) -> bytes:
    return ("POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (path, "".join(l + "\r\n" for l in lines))).encode()


def _read_response(sock: socket.socket, timeout_s: float) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response; raises socket.timeout if none comes in time."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response: %r" % data)
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ")[1]), body


@pytest.fixture(scope="module")
def small_limits():
    """A server that takes bodies up to 64 KiB, each within 0.5 s, and request heads within 0.5 s."""
    live = LiveServer(build_engine(**ENGINE_KW), ServerLimits(max_body_bytes=64 << 10, body_timeout_s=0.5),
                      header_timeout_s=0.5)
    yield live
    live.stop()


def test_a_body_over_the_cap_is_413_before_it_is_sent(small_limits):
    # Before: the whole body was read and parsed (four 50 MB prompts: RSS 291 MB -> 1.7 GB).
    with socket.create_connection(("127.0.0.1", _port(small_limits))) as s:
        s.sendall(_head("/v1/completions", "Content-Type: application/json", "Content-Length: 50000000"))
        status, body = _read_response(s, 5)   # not one byte of the 50 MB was sent
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    # chunked (no Content-Length): refused once the bytes read pass the cap
    with socket.create_connection(("127.0.0.1", _port(small_limits))) as s:
        s.sendall(_head("/v1/completions", "Content-Type: application/json", "Transfer-Encoding: chunked"))
        chunk = b'{"model": "tiny", "prompt": "' + b"x" * 16000
        for _ in range(5):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, body = _read_response(s, 5)
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    m = small_limits.metrics()
    assert m[("vmem_requests_rejected_total", (("status", "413"),))] == 2


def test_the_default_body_cap_fits_a_full_prompt_in_any_spelling():
    from vmem.server.app import BODY_BYTES_PER_TOKEN, body_bytes_for
    assert body_bytes_for(256) == 1 << 20 and body_bytes_for(128 * 1024) == BODY_BYTES_PER_TOKEN * 128 * 1024
    ids = [999_999] * 4096   # the longest token ids, as JSON: 8 bytes each with the separator
    assert len(json.dumps({"model": "m", "prompt": ids}, separators=(",", ":"))) < body_bytes_for(4096)
    text = "\u9f8d" * 4096   # one CJK character per token, \uXXXX-escaped as the openai client sends it
    assert len(json.dumps({"model": "m", "prompt": text})) < body_bytes_for(4096)
    live = LiveServer(build_engine(**ENGINE_KW))   # max_seq_len 256: the 1 MiB floor
    try:
        with socket.create_connection(("127.0.0.1", _port(live))) as s:
            s.sendall(_head("/v1/completions", "Content-Type: application/json", "Content-Length: %d" % ((1 << 20) + 1)))
            status, body = _read_response(s, 5)
        assert status == 413 and "1048576" in json.loads(body)["error"]["message"]
    finally:
        live.stop()


def test_a_body_that_trickles_in_is_408(small_limits):
    with socket.create_connection(("127.0.0.1", _port(small_limits))) as s:
        s.sendall(_head("/v1/completions", "Content-Type: application/json", "Content-Length: 100") + b'{"model"')
        t0 = time.monotonic()
        status, body = _read_response(s, 5)
    assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout"
    assert 0.4 < time.monotonic() - t0 < 4


def test_slow_request_heads_are_dropped_and_others_are_served(small_limits):
    # Before: uvicorn waits forever for a request head; 200 such connections stayed open.
    socks = [socket.create_connection(("127.0.0.1", _port(small_limits))) for _ in range(50)]
    try:
        for s in socks:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        assert httpx.get(small_limits.url + "/health", timeout=5).status_code == 200
        for i, s in enumerate(socks):
            s.settimeout(5)
            try:
                if i % 10 == 0:   # keeps sending, a header line every 0.2 s: still dropped
                    while time.monotonic() - t0 < 5:
                        s.sendall(b"X-Slow: 1\r\n")
                        time.sleep(0.2)
                got = s.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                got = b""
            assert got == b"" or got.startswith(b"HTTP/1.1 408"), got
        assert time.monotonic() - t0 < 5
    finally:
        for s in socks:
            s.close()
    r = small_limits.client.completions.create(model=MODEL, prompt="still serving", max_tokens=2)
    assert r.usage.completion_tokens >= 1


def test_parsing_and_tokenizing_run_off_the_event_loop(small_limits):
    tok = small_limits.engine.tokenizer
    threads = []
    real_encode = tok.encode

    def encode(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_encode(*args, **kwargs)

    tok.encode = encode
    try:
        big = httpx.post(small_limits.url + "/v1/completions", json={"model": MODEL, "prompt": "y" * 60000}, timeout=10)
        r = small_limits.client.completions.create(model=MODEL, prompt="tokenize me", max_tokens=2)
    finally:
        del tok.encode
    assert big.status_code == 400 and big.json()["error"]["code"] == "prompt_too_long"
    assert r.usage.prompt_tokens == len(real_encode("tokenize me"))
    assert threads and all(name.startswith("vmem-prepare") for name in threads), threads


def test_connections_past_the_limit_get_503():
    live = LiveServer(build_engine(**ENGINE_KW), max_connections=4)
    idle = [socket.create_connection(("127.0.0.1", _port(live))) for _ in range(4)]
    try:
        time.sleep(0.2)
        r = httpx.get(live.url + "/health", timeout=5)
        assert r.status_code == 503
        for s in idle:
            s.close()
        idle = []
        deadline = time.monotonic() + 5
        while httpx.get(live.url + "/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for s in idle:
            s.close()
        live.stop()


def test_head_health_is_200(small_limits):
    r = httpx.head(small_limits.url + "/health", timeout=5)
    assert r.status_code == 200


def test_api_key_guards_v1_and_leaves_health_and_metrics_open():
    live = LiveServer(build_engine(**ENGINE_KW), api_key="s3cret")
    try:
        r = live.client.completions.create(model=MODEL, prompt="with the key", max_tokens=2)
        assert r.usage.completion_tokens >= 1
        wrong = openai.OpenAI(base_url=live.url + "/v1", api_key="guess", max_retries=0, timeout=10)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.completions.create(model=MODEL, prompt="no", max_tokens=2)
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        for headers in ({}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "Bearer s3cret-not"}):
            r = httpx.get(live.url + "/v1/models", headers=headers, timeout=5)
            assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error", headers
        assert httpx.get(live.url + "/v1/models", headers={"Authorization": "bearer s3cret"}, timeout=5).status_code == 200
        assert httpx.get(live.url + "/health", timeout=5).status_code == 200
        assert httpx.head(live.url + "/health", timeout=5).status_code == 200
        m = parse_prometheus(httpx.get(live.url + "/metrics", timeout=5).text)
        assert m[("vmem_requests_rejected_total", (("status", "401"),))] == 5
    finally:
        live.stop()


@pytest.mark.parametrize("field,value", [("max_queued", 0), ("max_queued", -1), ("max_tokens", 0),
                                         ("max_prompt_tokens", 0), ("max_body_bytes", 0),
                                         ("body_timeout_s", float("nan")), ("max_queued", 2.5)])
def test_server_limits_that_would_refuse_everything_are_refused(field, value):
    with pytest.raises(VmemInvalidArgument, match=field):
        ServerLimits(**{field: value})


# ---------------------------------------------------------------------------------------------
# `vmem serve` as a process

@pytest.mark.parametrize("host,extra,warned", [("0.0.0.0", [], True), ("0.0.0.0", ["--api-key", "k"], False),
                                               ("::1", [], False), ("localhost", [], False)])
def test_a_host_beyond_loopback_without_a_key_is_warned_about(host, extra, warned, capsys):
    from vmem.cli import main
    # --memory 1: the engine refuses to start (exit 2) after the warning, before anything binds
    assert main(["serve", "--host", host, "--memory", "1", "--backend", "host", *extra]) == 2
    err = capsys.readouterr().err
    assert ("without authentication" in err) == warned, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_shutdown_under_load_ends_every_request_with_503_shutting_down(sig):
    # Before: after the grace period uvicorn cancelled the handlers: non-streaming requests got a
    # plain-text 500, streams were cut without an error event or [DONE]; SIGTERM exited with -15.
    port = _free_port()
    cmd = [sys.executable, "-m", "vmem", "serve", "--model", MODEL, "--max-batch", "8", "--max-seq-len", "4096",
           "--backend", "host", "--port", str(port), "--torch-threads", "1", "--shutdown-timeout", "1",
           "--log-level", "info"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = "http://127.0.0.1:%d" % port
    try:
        wait_for_server(proc, url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        kw = dict(model=MODEL, prompt="a long answer", max_tokens=4000, extra_body={"ignore_eos": True})
        # client disconnects on the way: each is aborted, none is logged as a warning
        with client.completions.create(stream=True, **kw) as s:
            next(iter(s))
        with pytest.raises(openai.APITimeoutError):
            openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=0.3).completions.create(**kw)

        results: dict = {}

        def plain(i):
            try:
                client.completions.create(**kw)
                results[i] = "finished"
            except openai.APIStatusError as e:
                results[i] = (e.status_code, e.code)

        def streamed(i):
            try:
                for _ in client.completions.create(stream=True, **kw):
                    pass
                results[i] = "finished"
            except openai.APIError as e:
                results[i] = ("stream", str(e.message))

        raw: list[str] = []

        def raw_stream():
            with httpx.stream("POST", url + "/v1/completions", json={**kw, **kw["extra_body"], "stream": True},
                              timeout=60) as r:
                raw.extend(line for line in r.iter_lines() if line)

        threads = [threading.Thread(target=plain if i % 2 else streamed, args=(i,)) for i in range(6)]
        threads.append(threading.Thread(target=raw_stream))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while parse_prometheus(httpx.get(url + "/metrics", timeout=5).text)[("vmem_requests_running", ())] < 7:
            assert time.monotonic() < deadline, "the 7 requests never ran together"
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(sig)
        for t in threads:
            t.join(30)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 20
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for i in range(6):
        if i % 2:
            assert results[i] == (503, "shutting_down"), results
        else:
            assert results[i] == ("stream", "server is shutting down"), results
    assert raw[-1] == "data: [DONE]"
    assert json.loads(raw[-2][len("data: "):])["error"]["code"] == "shutting_down"
    assert len(raw) > 3   # tokens streamed before the error
    bad = [line for line in out.splitlines() if "WARNING" in line or "ERROR" in line or "Traceback" in line]
    assert not bad, out[-3000:]
    assert "grace period of 1 s over" in out
