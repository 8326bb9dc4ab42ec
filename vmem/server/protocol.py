"""OpenAI wire format for the vmem server: request schemas, response and chunk builders, errors,
and the incremental detokenizer that turns token ids into streamed text.

Only what the reference engine can honour is accepted; a field it cannot honour (``n > 1``,
``logprobs``, ``echo``, penalties) is refused with a 400 that names it, never silently ignored.
Unknown extra fields are ignored, as OpenAI-compatible servers do.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)


def error_body(message: str, *, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# Requests

class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class _SamplingFields(_Strict):
    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    n: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    ignore_eos: StrictBool = False
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    user: StrictStr | None = None

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, "'stop' takes at most %d strings, got %d" % (MAX_STOP_STRINGS, len(stop)),
                           param="stop")
        if any(s == "" for s in stop):
            raise ApiError(400, "'stop' strings must not be empty", param="stop")
        return stop

    def check_supported(self) -> None:
        """Refuse what the engine cannot honour (400 naming the field)."""
        if self.n not in (None, 1):
            raise ApiError(400, "only n=1 is supported, got n=%d" % self.n, param="n")
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise ApiError(400, "'temperature' must be in [0, 2], got %g" % self.temperature,
                           param="temperature")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ApiError(400, "'top_p' must be in (0, 1], got %g" % self.top_p, param="top_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise ApiError(400, "'%s' is not supported by this server" % name, param=name)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's stream_options.continuous_usage_stats (with include_usage): usage in every chunk."""
        return self.include_usage and self.stream_options.continuous_usage_stats


PromptT = Union[StrictStr, list[StrictInt], list[StrictStr], list[list[StrictInt]]]


class CompletionRequest(_SamplingFields):
    prompt: PromptT
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise ApiError(400, "'echo' is not supported by this server", param="echo")
        if self.logprobs is not None:
            raise ApiError(400, "'logprobs' is not supported by this server", param="logprobs")
        if self.best_of not in (None, 1):
            raise ApiError(400, "only best_of=1 is supported", param="best_of")
        if self.suffix:
            raise ApiError(400, "'suffix' is not supported by this server", param="suffix")

    def single_prompt(self) -> str | list[int]:
        """The one prompt as text or token ids; batched prompts are refused."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if len(p) == 0:
            raise ApiError(400, "'prompt' must not be empty", param="prompt")
        if isinstance(p[0], int):
            return p
        if len(p) != 1:
            raise ApiError(400, "batched prompts are not supported: send one prompt per request "
                                "(got %d)" % len(p), param="prompt")
        return p[0]


class ContentPart(_Strict):
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ApiError(400, "only text content parts are supported, got %r" % part.type,
                               param="messages")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    tools: list[Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise ApiError(400, "'messages' must not be empty", param="messages")
        if self.logprobs:
            raise ApiError(400, "'logprobs' is not supported by this server", param="logprobs")
        if self.tools:
            raise ApiError(400, "'tools' are not supported by this server", param="tools")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


_FIELD_HINTS = {
    "prompt": "must be a string, a list of token ids, or a list holding one string",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of text parts",
}


def describe_validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """A 400 message (one clause per bad field) and the first bad field, from pydantic errors."""
    clauses: dict[str, str] = {}
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        kind = err.get("type")
        if kind == "json_invalid":
            detail = err.get("ctx", {}).get("error", err.get("msg"))
            return "request body is not valid JSON: %s" % detail, None
        if not loc:
            what = ("is missing" if kind == "missing" else
                    "must be a JSON object (send Content-Type: application/json)")
            return "request body %s" % what, None
        hinted = next((i for i, x in enumerate(loc) if x in _FIELD_HINTS), None)
        if hinted is not None:
            loc = loc[:hinted + 1]
        key = ".".join(loc)
        if key in clauses:   # a union field reports one error per branch: say what it accepts
            clauses[key] = _FIELD_HINTS[loc[-1]]
        else:
            clauses[key] = "is required" if kind == "missing" else err.get("msg", "is invalid")
    clauses = {key: "%s: %s" % (key, msg) for key, msg in clauses.items()}
    first = next(iter(clauses), None)
    return "; ".join(clauses.values()) or "invalid request", first


# ---------------------------------------------------------------------------------------------
# Responses

def new_id(prefix: str) -> str:
    return "%s-%s" % (prefix, uuid.uuid4().hex)


def usage(num_prompt_tokens: int, num_output_tokens: int, num_cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens the prefix cache served."""
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_output_tokens,
            "total_tokens": num_prompt_tokens + num_output_tokens,
            "prompt_tokens_details": {"cached_tokens": num_cached_tokens}}


class ResponseShaper:
    """Builds the JSON bodies and SSE chunks of one request (completion or chat)."""

    def __init__(self, chat: bool, request_id: str, model: str):
        self.chat = chat
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, usage_: dict | None = None) -> dict:
        out = {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
               "choices": choices}
        if usage_ is not None:
            out["usage"] = usage_
        return out

    def full(self, text: str, finish_reason: str | None, usage_: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion", [choice], usage_)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], usage_)

    def chunk(self, text: str, finish_reason: str | None = None, *, first: bool = False,
              usage_: dict | None = None) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant", "content": text} if first else {}
            if text and not first:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice], usage_)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], usage_)

    def usage_chunk(self, usage_: dict) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage_)


# ---------------------------------------------------------------------------------------------
# Detokenization

class TextStream:
    """Turns a growing list of token ids into text deltas, applying stop strings.

    Holds back what may still change: trailing U+FFFD (an incomplete UTF-8 sequence of a byte
    tokenizer) and the last ``max(len(stop)) - 1`` characters, which may be the start of a stop
    string. ``push`` returns ``(delta, stopped)``; once a stop string appears the text is cut
    before it, and ``stopped`` is True.
    """

    def __init__(self, decode, stop: list[str] | None = None):
        self._decode = decode
        self._stop = list(stop or [])
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""          # what has been emitted so far
        self.stopped = False

    def push(self, new_token_ids: list[int], finished: bool) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.token_ids.extend(new_token_ids)
        full = self._decode(self.token_ids)
        cut = self._find_stop(full)
        if cut is not None:
            full, finished, self.stopped = full[:cut], True, True
        end = len(full)
        if not finished:
            end = len(full.rstrip("\ufffd"))
            end = min(end, len(full) - self._hold)
        if end <= len(self.text) or not full.startswith(self.text):
            return "", self.stopped
        delta = full[len(self.text):end]
        self.text += delta
        return delta, self.stopped

    def _find_stop(self, full: str) -> int | None:
        start = max(0, len(self.text) - self._hold)
        hits = [i for i in (full.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None
