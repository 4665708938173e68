"""Chat and text completions forwarded to vLLM, streamed back chunk by chunk.

The body goes to vLLM as the client sent it (so every vLLM feature keeps working), with the
model id pinned and `stream_options.include_usage` switched on for streams: the final usage
chunk gives exact token counts. The gateway reads each SSE event on the way through for the
completion id, TTFT (first chunk carrying text) and usage; it drops the usage chunk again when
the client did not ask for it. Non-streamed answers give tokens but no TTFT (vLLM returns them
whole), so `toolkit_time_to_first_token_seconds` comes from streamed requests only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response

from toolkit.serve.admission import Slot
from toolkit.serve.engines.base import ProxyEngine
from toolkit.serve.gateway import Gateway, parse_body
from toolkit.serve.generation import GuardedStream
from toolkit.serve.lifecycle import Stops, stream_failure, until_stopped
from toolkit.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    error_body,
)

log = logging.getLogger("toolkit.serve")
UPSTREAM_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def _prompt_of(req: ChatCompletionRequest | CompletionRequest) -> Any:
    if isinstance(req, CompletionRequest):
        return req.prompt_text()
    messages = []
    for message in req.messages:
        try:
            messages.append({"role": message.role, "content": message.text()})
        except OpenAIError:  # non-text parts (images...) are not recorded
            messages.append({"role": message.role, "content": ""})
    return messages


def _error_json(status: int, content: bytes) -> bytes:
    """vLLM's error body in OpenAI's shape (older vLLMs answer {"object": "error", ...})."""
    try:
        payload = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return content
    message = payload.get("message") if isinstance(payload, dict) else None
    kind = payload.get("type") if isinstance(payload, dict) else None
    return json.dumps(error_body(str(message or content[:500].decode(errors="replace")),
                                 kind or ("invalid_request_error" if status < 500 else "server_error"),
                                 code=str(status))).encode()


async def handle_proxy(gateway: Gateway, request: Request, endpoint: str) -> Any:
    """Forward one completion request to the proxy engine."""
    started = time.perf_counter()
    model = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
    raw, req = await parse_body(request, model, gateway)
    engine: ProxyEngine = gateway.engine  # type: ignore[assignment]
    if not engine.ready():
        raise OpenAIError(503, f"the engine is {engine.status().get('state', 'not ready')}; "
                          "retry shortly", type="server_error", code="engine_not_ready",
                          headers={"Retry-After": "5"})
    body = dict(raw)
    body["model"] = gateway.info.model_name
    if req.stream:
        body["stream_options"] = {**(raw.get("stream_options") or {}), "include_usage": True}
    slot = await gateway.admission.acquire()
    # vLLM answers a non-streamed request only when it is whole: a client that leaves meanwhile,
    # or the shutdown cut, closes the upstream request, which makes vLLM abort it
    stops = Stops(gateway.cut, None if req.stream else request.receive)
    relayed = False
    try:
        try:
            upstream = await stops.wait(engine.send(UPSTREAM_PATHS[endpoint], body))
        except httpx.HTTPError as exc:
            raise OpenAIError(503, f"the engine is unreachable ({type(exc).__name__}); retry "
                              "shortly", type="server_error", code="engine_unreachable",
                              headers={"Retry-After": "5"}) from None
        if req.stream and upstream.status_code == 200:
            relay = _Relay(gateway, upstream, started, endpoint, req, slot, request.scope)
            relayed = True
            return GuardedStream(relay.events(), slot)
        try:
            content = await stops.wait(upstream.aread())
        finally:
            await upstream.aclose()
    finally:
        stops.close()
        if not relayed:  # the stream gives its slot back itself
            slot.release()
    if upstream.status_code != 200:
        return Response(_error_json(upstream.status_code, content), upstream.status_code,
                        media_type="application/json")
    payload = json.loads(content)
    counts = payload.get("usage") or {}
    gateway.observe(started, None, None, int(counts.get("prompt_tokens", 0)),
                    int(counts.get("completion_tokens", 0)))
    choice = (payload.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") if endpoint == "chat" else choice.get("text")
    await gateway.record(str(payload.get("id")), endpoint, int(payload.get("created") or 0),
                         req.metadata, _prompt_of(req), text or "")
    return Response(content, 200, media_type="application/json")


class _Relay:
    """Pass SSE events through while reading ids, text, timings and usage from them."""

    def __init__(self, gateway: Gateway, upstream: httpx.Response, started: float,
                 endpoint: str, req: ChatCompletionRequest | CompletionRequest, slot: Slot,
                 scope: Any) -> None:
        self.gateway, self.upstream, self.started = gateway, upstream, started
        self.endpoint, self.req, self.slot, self.scope = endpoint, req, slot, scope
        self.client_usage = req.include_usage()
        self.cid: str | None = None
        self.created = 0
        self.parts: list[str] = []
        self.chunks = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.usage: dict[str, int] | None = None
        self.finished = False

    async def events(self) -> AsyncIterator[bytes]:
        """The upstream events; vLLM failing mid-stream ends it with an error event, `[DONE]`."""
        buffer = b""
        chunks = until_stopped(self.upstream.aiter_raw(), self.gateway.cut)
        try:
            async for data in chunks:
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if event.strip() == b"data: [DONE]":
                        await self._finish()
                    elif not self._read(event):
                        continue
                    yield event + b"\n\n"
            if buffer.strip():
                yield buffer
        except Exception as exc:  # noqa: BLE001 - any failure ends the stream with an error event
            for event in stream_failure(self.scope, exc, "the vLLM stream"):
                yield event
        finally:
            self.slot.release()
            await chunks.aclose()
            await self.upstream.aclose()

    def _read(self, event: bytes) -> bool:
        """Take what the gateway needs from one event; False drops it (unrequested usage)."""
        if not event.startswith(b"data: "):
            return True
        try:
            payload = json.loads(event[6:])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return True
        if not isinstance(payload, dict):
            return True
        self.cid = self.cid or payload.get("id")
        self.created = self.created or int(payload.get("created") or 0)
        choices = payload.get("choices")
        if payload.get("usage") and not choices:
            self.usage = payload["usage"]
            return self.client_usage
        for choice in choices or []:
            text = (choice.get("delta") or {}).get("content") if self.endpoint == "chat" \
                else choice.get("text")
            if text:
                stamp = time.perf_counter()
                self.first_at = self.first_at or stamp
                self.last_at = stamp
                self.chunks += 1
                self.parts.append(text)
        return True

    async def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        usage = self.usage or {}
        self.gateway.observe(self.started, self.first_at, self.last_at,
                             int(usage.get("prompt_tokens", 0)),
                             int(usage.get("completion_tokens", self.chunks)))
        if self.cid:
            await self.gateway.record(self.cid, self.endpoint, self.created, self.req.metadata,
                                      _prompt_of(self.req), "".join(self.parts))
