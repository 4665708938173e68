"""Chat and text completions through an in-process engine: OpenAI bodies and SSE streams.

The slot taken from admission control is held for the whole generation, streamed or not, and
given back in a `finally`, so a client that disconnects frees it at once: Starlette cancels a
stream whose client left, and `lifecycle.until_stopped` watches a non-streamed request's
connection; either way the engine's generator closes, which cancels the engine request. A
failure after a stream's `200` header ends the stream with an error event and `[DONE]`, counted
as a 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from toolkit.serve.admission import Slot
from toolkit.serve.engines.base import (
    GeneratingEngine,
    GenerationRequest,
    PreparedRequest,
    SamplingParams,
)
from toolkit.serve.gateway import Gateway, parse_body
from toolkit.serve.lifecycle import stream_failure, until_stopped
from toolkit.serve.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    TextChunks,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    new_completion_id,
    now,
    sse,
    usage_chunk,
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class GuardedStream(StreamingResponse):
    """An SSE response that frees its slot even when the body never started (early disconnect)."""

    def __init__(self, body: AsyncIterator[bytes], slot: Slot) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self._slot = slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slot.release()


def to_generation_request(req: ChatCompletionRequest | CompletionRequest,
                          engine: str) -> GenerationRequest:
    """The engine-facing request (OpenAI defaults: temperature 1, top_p 1).

    Raises:
        OpenAIError: 400 for a parameter `engine` cannot honour (logprobs, tools...).
    """
    req.check_honoured(engine)
    sampling = SamplingParams(
        max_tokens=req.token_limit(),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed, stop=req.stop_list(), ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
    )
    if isinstance(req, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return GenerationRequest(sampling, messages=messages, cache_salt=req.cache_salt)
    return GenerationRequest(sampling, prompt=req.prompt_text(), cache_salt=req.cache_salt)


class _Run:
    """One generation's text, counts and timings."""

    def __init__(self, prepared: PreparedRequest) -> None:
        self.prepared = prepared
        self.parts: list[str] = []
        self.tokens = 0
        self.finish_reason: str | None = None
        self.first_at: float | None = None
        self.last_at: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, text: str, tokens: int, finish_reason: str | None) -> None:
        stamp = time.perf_counter()
        if self.first_at is None and tokens:
            self.first_at = stamp
        if tokens:
            self.last_at = stamp
        self.tokens += tokens
        self.parts.append(text)
        self.finish_reason = finish_reason or self.finish_reason


async def handle_generation(gateway: Gateway, request: Request, endpoint: str) -> Any:
    """`POST /v1/chat/completions` (endpoint "chat") or `/v1/completions` ("completions")."""
    started = time.perf_counter()
    model = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
    _, req = await parse_body(request, model, gateway)
    engine: GeneratingEngine = gateway.engine  # type: ignore[assignment]
    if not engine.ready():
        raise OpenAIError(503, "the engine is not ready yet; retry shortly", type="server_error",
                          code="engine_not_ready", headers={"Retry-After": "5"})
    generation = to_generation_request(req, gateway.info.engine)
    slot = await gateway.admission.acquire()
    try:
        # tokenized off the event loop and while holding a slot: a long prompt delays nobody
        # else, and a flood of them queues and gets 429 like any other load
        prepared = await asyncio.to_thread(engine.prepare, generation)
    except BaseException:
        slot.release()
        raise
    if req.token_limit() is None:  # the engine resolved "the rest of the context"; cap it
        prepared.max_tokens = min(prepared.max_tokens, gateway.settings.max_tokens_default)
        if req.min_tokens > prepared.max_tokens:
            slot.release()
            raise OpenAIError(400, f"min_tokens ({req.min_tokens}) is over this answer's limit "
                              f"of {prepared.max_tokens} tokens (the server's default or the "
                              "context left); lower min_tokens or send max_tokens",
                              param="min_tokens")
    cid = new_completion_id("chat" if endpoint == "chat" else "completion")
    created = now()
    prompt = prepared.request.messages if endpoint == "chat" else prepared.request.prompt
    if req.stream:
        body = _stream(gateway, engine, prepared, endpoint, cid, created, started, req, prompt,
                       slot, request.scope)
        return GuardedStream(body, slot)
    run = _Run(prepared)
    try:
        async for chunk in until_stopped(engine.generate(prepared), gateway.cut, request.receive):
            run.add(chunk.text, chunk.tokens, chunk.finish_reason)
    finally:
        slot.release()
    gateway.observe(started, run.first_at, run.last_at, prepared.prompt_tokens, run.tokens)
    await gateway.record(cid, endpoint, created, req.metadata, prompt, run.text)
    name = gateway.info.model_name
    build = chat_response if endpoint == "chat" else completion_response
    return JSONResponse(build(cid, created, name, run.text, run.finish_reason,
                              prepared.prompt_tokens, run.tokens))


async def _stream(gateway: Gateway, engine: GeneratingEngine, prepared: PreparedRequest,
                  endpoint: str, cid: str, created: int, started: float,
                  req: ChatCompletionRequest | CompletionRequest, prompt: Any,
                  slot: Slot, scope: Any) -> AsyncIterator[bytes]:
    """SSE chunks; always releases the slot and cancels the engine request when closed.

    Any failure after the `200` went out ends the stream with an error event then `[DONE]`
    (`lifecycle.stream_failure`).
    """
    name = gateway.info.model_name
    chat = endpoint == "chat"
    run = _Run(prepared)
    texts = TextChunks(cid, created, name, chat)
    generator = engine.generate(prepared)
    chunks = until_stopped(generator, gateway.cut)
    try:
        if chat:
            yield sse(chat_chunk(cid, created, name, {"role": "assistant", "content": ""}))
        try:
            async for chunk in chunks:
                run.add(chunk.text, chunk.tokens, chunk.finish_reason)
                if chunk.text:
                    yield texts.event(chunk.text)
        except Exception as exc:  # noqa: BLE001 - any failure ends the stream with an error event
            for event in stream_failure(scope, exc, f"generation {cid}"):
                yield event
            return
        gateway.observe(started, run.first_at, run.last_at, prepared.prompt_tokens, run.tokens)
        await gateway.record(cid, endpoint, created, req.metadata, prompt, run.text)
        yield sse(chat_chunk(cid, created, name, {}, run.finish_reason) if chat
                  else completion_chunk(cid, created, name, "", run.finish_reason))
        if req.include_usage():
            yield sse(usage_chunk(cid, created, name,
                                  "chat.completion.chunk" if chat else "text_completion",
                                  prepared.prompt_tokens, run.tokens))
        yield SSE_DONE
    finally:
        slot.release()
        with contextlib.suppress(Exception):
            await chunks.aclose()
            await generator.aclose()
