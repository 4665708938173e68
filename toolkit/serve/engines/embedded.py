"""What the in-process engines share: prompt rendering, context checks and the batch loop.

`transformers_engine` and `onnx_engine` only say how to load a model and how to run one
batched step (`StepBackend`); tokenization, chat templates, limits and streaming live here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any, Literal

from toolkit.runtime.speculation import NgramSpeculation
from toolkit.serve.engines.base import (
    EngineInfo,
    GenerationChunk,
    GenerationRequest,
    PreparedRequest,
    context_error_message,
)
from toolkit.serve.engines.batching import BatchScheduler, SchedulerStats, StepBackend
from toolkit.serve.protocol import OpenAIError

log = logging.getLogger("toolkit.serve")


class EmbeddedEngine:
    """A `GeneratingEngine` over a tokenizer and a `StepBackend` built by `load`.

    Args:
        info: what is served (model name, format, engine name, context length).
        load: builds `(tokenizer, backend, eos_ids)`; runs in a worker thread at `start`.
        max_batch: rows decoded together.
        on_thread_start: runs on the decode thread first (torch thread count).
        speculation: drafts for greedy requests, where the backend can check them.
    """

    kind: Literal["generate"] = "generate"

    def __init__(self, info: EngineInfo,
                 load: Callable[[], tuple[Any, StepBackend, frozenset[int]]],
                 max_batch: int, on_thread_start: Callable[[], None] | None = None,
                 speculation: NgramSpeculation | None = None) -> None:
        self.info = info
        self._speculation = speculation
        self._load = load
        self._max_batch = max_batch
        self._on_thread_start = on_thread_start
        self.tokenizer: Any = None
        self.scheduler: BatchScheduler | None = None
        self._error: str | None = None
        self._longest_token = 1

    async def start(self) -> None:
        """Load the model in a worker thread, then start the decode loop."""
        try:
            tokenizer, backend, eos = await asyncio.to_thread(self._load)
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}"
            raise
        self.tokenizer = tokenizer
        self._longest_token = max(map(len, tokenizer.get_vocab()), default=1)
        self.scheduler = BatchScheduler(
            backend, self._decode, eos, self._max_batch, name=self.info.engine,
            on_thread_start=self._on_thread_start, speculation=self._speculation,
        )
        self.scheduler.start()

    async def stop(self) -> None:
        """Stop the decode loop."""
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop)

    def ready(self) -> bool:
        """Loaded and the decode thread alive."""
        return self.scheduler is not None and self.scheduler.alive()

    def status(self) -> dict[str, Any]:
        """State, batching counters and, when the backend keeps one, its prefix cache's."""
        stats = asdict(self.scheduler.stats if self.scheduler else SchedulerStats())
        cache = getattr(self.scheduler.backend, "prefix_cache", None) if self.scheduler else None
        return {
            "state": "ready" if self.ready() else ("failed" if self._error else "loading"),
            "error": self._error,
            **{key: round(value, 3) if isinstance(value, float) else value
               for key, value in stats.items()},
            **({"prefix_cache": asdict(cache.stats)} if cache is not None else {}),
        }

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def render(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids: the chat template for messages, the raw text for prompts."""
        if request.messages is not None:
            messages = [{"role": "system" if m["role"] == "developer" else m["role"],
                         "content": m["content"]} for m in request.messages]
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 - templates raise their own error types
                raise OpenAIError(400, f"the chat template refused these messages: {exc}",
                                  param="messages") from None
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(request.prompt or "")["input_ids"])

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Tokenize and check the request against the context length."""
        if self.tokenizer is None:
            raise OpenAIError(503, "the engine is still loading", type="server_error",
                              code="engine_not_ready")
        self._check_length_bound(request)
        ids = self.render(request)
        if not ids:
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        limit = self.info.max_model_len
        wanted = request.sampling.max_tokens
        if len(ids) >= limit:
            raise OpenAIError(400, context_error_message(limit, len(ids), wanted or 1),
                              param="messages" if request.messages is not None else "prompt",
                              code="context_length_exceeded")
        if wanted is not None and len(ids) + wanted > limit:
            raise OpenAIError(400, context_error_message(limit, len(ids), wanted),
                              param="max_tokens", code="context_length_exceeded")
        return PreparedRequest(request, ids, wanted if wanted is not None else limit - len(ids))

    def _check_length_bound(self, request: GenerationRequest) -> None:
        """Refuse a prompt that cannot fit the context without tokenizing it.

        No token covers more characters than the longest vocabulary entry (byte-level entries
        spell one character per byte, SentencePiece ones one per character, byte fallbacks
        `<0x0A>` more), so `characters / longest` is a lower bound on the prompt's tokens (for
        tokenizers without a normalizer that deletes characters; causal LMs' do not). A
        too-long prompt is then refused in microseconds instead of seconds of tokenizer time.

        Raises:
            OpenAIError: 400 `context_length_exceeded`.
        """
        if request.messages is not None:
            chars, param = sum(len(m["content"]) for m in request.messages), "messages"
        else:
            chars, param = len(request.prompt or ""), "prompt"
        at_least = chars // self._longest_token
        limit = self.info.max_model_len
        if at_least >= limit:
            raise OpenAIError(
                400, f"This model's maximum context length is {limit} tokens. However, you "
                f"sent {chars} characters in `{param}`, at least {at_least} tokens. Please "
                "reduce the length of the messages.", param=param, code="context_length_exceeded")

    async def generate(self, prepared: PreparedRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the request's chunks from the decode thread; closing cancels it."""
        if self.scheduler is None:
            raise OpenAIError(503, "the engine is not ready", type="server_error")
        handle = self.scheduler.submit(prepared)
        try:
            while True:
                item = await handle.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            handle.cancel()
