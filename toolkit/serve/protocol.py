"""OpenAI-shaped request and response bodies, and the error body every failure uses.

Requests are pydantic models so a bad value fails with the field's name; unknown fields are kept
(clients send many optional ones) and forwarded as they are to vLLM, which may use them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

#: OpenAI's limit on stop sequences
MAX_STOP_STRINGS = 4
#: Longest stop string in characters. Real stops are short ("\n\n", "</answer>", a sentence);
#: matching is linear in it, but each one is held back from a stream until it is ruled out and
#: costs its length in setup per request, so it is bounded well above any real use.
MAX_STOP_CHARS = 1000
#: Longest `cache_salt`: a tenant key or a hash of one, kept with every cached block's key
MAX_CACHE_SALT_CHARS = 256


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")  # noqa: TRY004 - pydantic reports only ValueError as a field error
    return value


#: a float that refuses `true`/`false` (pydantic would read them as 1.0 and 0.0)
Number = Annotated[float, BeforeValidator(_no_bool)]


def _absent(value: Any) -> bool:
    return value is None or value is False


#: parameters the embedded engines do not implement -> the values that ask for nothing; any
#: other value gets a 400 rather than an answer silently without the feature (vLLM honours
#: them all, so the proxy path forwards them)
UNHONOURED: dict[str, Callable[[Any], bool]] = {
    "echo": _absent,
    "logprobs": _absent,
    "top_logprobs": lambda v: v is None or v == 0,
    "tools": lambda v: v is None or v == [],
    "tool_choice": lambda v: v is None or v == "none",
    "functions": lambda v: v is None or v == [],
    "function_call": lambda v: v is None or v == "none",
    "response_format": lambda v: v is None or v == {"type": "text"},
    "logit_bias": lambda v: v is None or v == {},
    "presence_penalty": lambda v: v is None or v == 0,
    "frequency_penalty": lambda v: v is None or v == 0,
    "suffix": lambda v: v is None or v == "",
    "best_of": lambda v: v is None or v == 1,
}


class OpenAIError(Exception):
    """An error answered as `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body, shaped as the OpenAI API shapes its errors."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}` (what the openai client parses)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ContentPart(BaseModel):
    """One part of a multi-part message; only text parts are served."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message as plain text (text parts joined; other part types are refused)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise OpenAIError(400, f"content part type {part.type!r} is not supported; "
                                  "send text parts only", param="messages")
            parts.append(part.text)
        return "".join(parts)


class StreamOptions(BaseModel):
    """`stream_options`: `include_usage` adds a final chunk with token counts."""

    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _GenerationFields(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str | None = Field(default=None, description="Served model id (see /v1/models).")
    temperature: Number | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Number | None = Field(default=None, ge=0.0, le=1.0, description="0 means greedy.")
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=0, description="numpy seeds are >= 0.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(default=1, ge=1, le=1, description="Only one choice per request is served.")
    presence_penalty: Number | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Number | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None
    metadata: dict[str, str] | None = Field(
        default=None, description="Request tags (e.g. category) stored with the completion id."
    )
    ignore_eos: StrictBool = Field(
        default=False, description="vLLM's extra field: keep decoding past the end-of-sequence "
        "token until max_tokens (benchmarks use it for answers of equal length).")
    min_tokens: StrictInt = Field(
        default=0, ge=0, description="vLLM's extra field: neither the end-of-sequence token nor "
        "a stop string ends the answer before this many tokens.")
    cache_salt: str | None = Field(
        default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS,
        description="vLLM's extra field: a prompt reuses cached prompt prefixes only from "
        "requests with the same salt (give each tenant its own), so nobody can time whether "
        "another tenant sent a prompt; without it, requests share the cache.")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not item for item in items):
            raise ValueError("stop strings must be non-empty")
        if any(len(item) > MAX_STOP_CHARS for item in items):
            raise ValueError(f"stop strings must have at most {MAX_STOP_CHARS} characters")
        return value

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (len(value) > 16 or any(len(k) > 64 or len(v) > 512
                                                         for k, v in value.items())):
            raise ValueError("metadata: at most 16 keys, keys <= 64 and values <= 512 characters")
        return value

    @model_validator(mode="after")
    def _check_min_tokens(self) -> _GenerationFields:
        limit = self.token_limit()
        if limit is not None and self.min_tokens > limit:
            # an OpenAIError passes through pydantic unchanged, so the 400 names its param (a
            # ValueError from a model validator would have no field location)
            raise OpenAIError(400, f"min_tokens ({self.min_tokens}) must be at most max_tokens "
                              f"({limit}); lower min_tokens or raise max_tokens",
                              param="min_tokens")
        return self

    def token_limit(self) -> int | None:
        """The answer's token limit the client sent, if any."""
        return self.max_tokens

    def stop_list(self) -> list[str]:
        """Stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_honoured(self, engine: str) -> None:
        """Refuse a parameter the embedded `engine` would silently ignore.

        Raises:
            OpenAIError: 400 `unsupported_parameter` naming the first such parameter.
        """
        sent = self.model_fields_set | set(self.model_extra or {})
        for name, harmless in UNHONOURED.items():
            if name in sent and not harmless(getattr(self, name)):
                raise OpenAIError(400, f"{name}: the {engine} engine does not support this "
                                  f"parameter; remove it (or serve with --engine vllm)",
                                  param=name, code="unsupported_parameter")


class ChatCompletionRequest(_GenerationFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_limit(self) -> int | None:
        """`max_completion_tokens` (the newer name) or `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_GenerationFields):
    """`POST /v1/completions` (one prompt string)."""

    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("send one prompt string per request")
        return value

    def prompt_text(self) -> str:
        """The prompt string."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class FeedbackRequest(BaseModel):
    """`POST /v1/feedback`: a rating on one completion the gateway returned.

    `rating` is -1 or 1 on the thumbs scale, 1..5 on the stars scale. Without `scale`, -1 is
    thumbs, 2..5 are stars, and 1 is thumbs (up); send `scale: "stars"` to mean one star.
    """

    model_config = ConfigDict(extra="forbid")
    completion_id: str = Field(min_length=1, max_length=200)
    rating: StrictInt
    scale: Literal["thumbs", "stars"] | None = None
    comment: str | None = Field(default=None, max_length=20_000)
    correction: str | None = Field(default=None, max_length=100_000)

    @model_validator(mode="after")
    def _check_rating(self) -> FeedbackRequest:
        scale = self.resolved_scale()
        if scale == "thumbs" and self.rating not in (-1, 1):
            raise ValueError(f"rating {self.rating} is not a thumbs rating; send -1 or 1")
        if scale == "stars" and not 1 <= self.rating <= 5:
            raise ValueError(f"rating {self.rating} is not a stars rating; send 1 to 5")
        return self

    def resolved_scale(self) -> Literal["thumbs", "stars"]:
        """The scale sent, else thumbs for -1 and 1 and stars otherwise."""
        if self.scale is not None:
            return self.scale
        return "thumbs" if self.rating in (-1, 1) else "stars"


def new_completion_id(kind: Literal["chat", "completion"]) -> str:
    """A unique id in OpenAI's style (`chatcmpl-...`, `cmpl-...`)."""
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The `usage` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(cid: str, created: int, model: str, text: str, finish_reason: str | None,
                  prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A non-streamed chat completion."""
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(cid: str, created: int, model: str, delta: dict[str, Any],
               finish_reason: str | None = None) -> dict[str, Any]:
    """One streamed chat chunk."""
    return {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def completion_response(cid: str, created: int, model: str, text: str, finish_reason: str | None,
                        prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A non-streamed text completion."""
    return {
        "id": cid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(cid: str, created: int, model: str, text: str,
                     finish_reason: str | None = None) -> dict[str, Any]:
    """One streamed text-completion chunk."""
    return {
        "id": cid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(cid: str, created: int, model: str, object_name: str, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with `include_usage`: no choices, only `usage`."""
    return {"id": cid, "object": object_name, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON payload."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
#: stands for the text in a chunk encoded once per stream (a character no tokenizer emits alone)
_TEXT_SLOT = "\ufdd0"


class TextChunks:
    """The SSE events of one stream's text chunks, with everything but the text encoded once.

    A stream sends one event per decoded token, all equal to `sse(chat_chunk(...))` (or
    `completion_chunk`) but for the text; encoding the whole dict per token was the largest
    per-token cost of the gateway (json.dumps of ~200 bytes, 16 clients x every step), so the
    event is split once around the text and only the text is JSON-encoded per token.
    """

    def __init__(self, cid: str, created: int, model: str, chat: bool) -> None:
        payload = (chat_chunk(cid, created, model, {"content": _TEXT_SLOT}) if chat
                   else completion_chunk(cid, created, model, _TEXT_SLOT))
        # the text is the last string of the event: a model name holding the slot stays intact
        head, _, tail = sse(payload).rpartition(json.dumps(_TEXT_SLOT, ensure_ascii=False).encode())
        self._head, self._tail = head, tail

    def event(self, text: str) -> bytes:
        """The event carrying `text` (byte-identical to the one built from the dict)."""
        return self._head + json.dumps(text, ensure_ascii=False).encode() + self._tail


def now() -> int:
    """`created` timestamps are whole seconds."""
    return int(time.time())
