"""The server's pure parts: detokenizer with stop strings, request validation, Prometheus output."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from vmem.server.protocol import (  # noqa: E402
    ApiError, ChatCompletionRequest, CompletionRequest, ResponseShaper, TextStream,
    describe_validation_errors,
)
from vmem.server.loop import Histogram, ServerMetrics  # noqa: E402


def byte_decode(ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def feed(stream: TextStream, ids: list[int], finish_at_end: bool = True) -> list[str]:
    deltas = []
    for k, t in enumerate(ids):
        delta, stopped = stream.push([t], finish_at_end and k == len(ids) - 1)
        deltas.append(delta)
        if stopped:
            break
    return deltas


def test_text_stream_holds_back_split_utf8():
    ids = list("aé€😀b".encode())
    deltas = feed(TextStream(byte_decode), ids)
    assert "".join(deltas) == "aé€😀b"
    assert all("\ufffd" not in d for d in deltas)
    # é is two bytes: nothing comes out for its first byte
    assert deltas[:3] == ["a", "", "é"]


def test_text_stream_flushes_invalid_bytes_when_finished():
    ids = [0x61, 0xE2, 0x82]   # "a" + a truncated 3-byte sequence
    deltas = feed(TextStream(byte_decode), ids)
    assert "".join(deltas) == byte_decode(ids)
    assert deltas[-1].endswith("\ufffd")


def test_text_stream_cuts_at_stop_string_spanning_tokens():
    stream = TextStream(byte_decode, stop=["STOP", "xyz"])
    deltas = feed(stream, list(b"hello STOP world"), finish_at_end=False)
    assert "".join(deltas) == "hello "
    assert stream.stopped
    # nothing that could begin the stop string was emitted early
    assert "S" not in "".join(deltas)


def test_text_stream_earliest_stop_wins_and_partial_match_is_released():
    stream = TextStream(byte_decode, stop=["cd", "abcx"])
    deltas = feed(stream, list(b"abcd"), finish_at_end=False)
    assert "".join(deltas) == "ab" and stream.stopped
    stream = TextStream(byte_decode, stop=["STOP"])
    assert "".join(feed(stream, list(b"STO then"))) == "STO then"
    assert not stream.stopped


def test_text_stream_no_stop_emits_each_token_at_once():
    stream = TextStream(byte_decode)
    assert [stream.push([t], False)[0] for t in b"abc"] == ["a", "b", "c"]


def test_request_checks_name_the_field():
    req = CompletionRequest.model_validate({"model": "m", "prompt": "p", "n": 3})
    with pytest.raises(ApiError, match="n=1") as e:
        req.check_supported()
    assert e.value.status_code == 400 and e.value.param == "n"
    req = CompletionRequest.model_validate({"model": "m", "prompt": "p", "stop": ["a", ""]})
    with pytest.raises(ApiError, match="empty"):
        req.stop_strings()
    req = CompletionRequest.model_validate({"model": "m", "prompt": "p", "stop": list("abcde")})
    with pytest.raises(ApiError, match="at most 4"):
        req.stop_strings()
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2]]}).single_prompt() == [1, 2]
    with pytest.raises(ApiError, match="one prompt"):
        CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]}).single_prompt()
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}],
         "max_tokens": 3, "max_completion_tokens": 5})
    assert chat.messages[0].text() == "ab" and chat.requested_max_tokens() == 5


def test_validation_errors_become_one_readable_message():
    from pydantic import ValidationError
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({"model": "m", "prompt": [1, "a"], "max_tokens": "7"})
    message, param = describe_validation_errors(e.value.errors())
    assert "prompt: must be a string, a list of token ids" in message   # one clause, not one per branch
    assert message.count("prompt") == 1
    assert "max_tokens: Input should be a valid integer" in message
    assert param == "max_tokens"   # the first field pydantic reports
    assert describe_validation_errors([{"type": "missing", "loc": ("body",), "msg": "x"}])[0] == \
        "request body is missing"


def test_chunks_follow_openai_shapes():
    chat = ResponseShaper(True, "chatcmpl-1", "m")
    first = chat.chunk("", first=True)
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chat.chunk("hi")["choices"][0]["delta"] == {"content": "hi"}
    assert chat.chunk("", "length")["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                                     "finish_reason": "length"}
    assert chat.usage_chunk({"total_tokens": 3})["choices"] == []
    full = ResponseShaper(False, "cmpl-1", "m").full("abc", "stop", {"total_tokens": 1})
    assert full["choices"][0]["text"] == "abc" and full["object"] == "text_completion"


def test_histogram_is_cumulative():
    h = Histogram(buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 3.0):
        h.observe(v)
    lines = h.render("x_seconds", "help")
    assert 'x_seconds_bucket{le="0.1"} 1' in lines
    assert 'x_seconds_bucket{le="1.0"} 3' in lines
    assert 'x_seconds_bucket{le="+Inf"} 4' in lines
    assert "x_seconds_count 4" in lines


def test_metrics_render_engine_stats():
    class Loop:   # what ServerMetrics.render reads from EngineLoop
        stats = {"total_pages": 10, "used_pages": 3, "mapped_pages": 4, "reclaimable_pages": 1,
                 "free_pages": 6, "used_bytes": 3 * 4096, "num_preemptions": 2, "kind": "vmem"}
        num_running, num_queued, num_steps, alive = 2, 5, 7, True

    m = ServerMetrics()
    m.on_finish("length", 4, 8, 0.01, 0.2)   # TPOT (0.2 - 0.01) / 7 = 27 ms
    m.on_reject(429)
    text = m.render(Loop())
    assert 'vmem_kv_pages{state="used"} 3' in text
    assert 'vmem_kv_bytes{state="used"} 12288' in text
    assert "vmem_requests_waiting 5" in text
    assert "vmem_preemptions_total 2" in text
    assert 'vmem_requests_rejected_total{status="429"} 1' in text
    assert 'vmem_requests_finished_total{reason="length"} 1' in text
    assert "kind" not in text.replace("vmem_engine_stat", "")   # strings are not samples
    assert 'vmem_time_per_output_token_seconds_bucket{le="0.025"} 0' in text
    assert 'vmem_time_per_output_token_seconds_bucket{le="0.05"} 1' in text
