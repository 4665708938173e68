"""The engine protocol the gateway serves through, and the plain records engines exchange.

Two kinds of engine sit behind the gateway:
- a *generating* engine (transformers, ONNX Runtime, the tests' fake) tokenizes with
  `prepare` and yields `GenerationChunk`s; the gateway builds the OpenAI bodies itself;
- a *proxy* engine (vLLM) already speaks the OpenAI API: the gateway forwards the request body
  and passes the answer through chunk by chunk, reading token counts from it on the way.

Engines report numbers (tokens, finish reasons); only the app turns them into metrics.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable


@dataclass(frozen=True)
class EngineInfo:
    """What is served, as `/v1/models` and `toolkit_model_info` show it."""

    model_name: str
    format: str
    quantization: str
    engine: str
    max_model_len: int
    path: str = ""


@dataclass
class SamplingParams:
    """Decoding settings of one request (OpenAI semantics)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    #: decode past the end-of-sequence token up to max_tokens (vLLM's `ignore_eos`)
    ignore_eos: bool = False
    #: neither end-of-sequence nor a stop string ends the answer before this many tokens
    min_tokens: int = 0


@dataclass
class GenerationRequest:
    """A chat (`messages`) or text (`prompt`) request, before tokenization."""

    sampling: SamplingParams
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    #: scopes prompt-prefix reuse (vLLM's `cache_salt`): None shares it with every request
    cache_salt: str | None = None


@dataclass
class PreparedRequest:
    """A request tokenized and checked against the context length."""

    request: GenerationRequest
    prompt_ids: list[int]
    max_tokens: int

    @property
    def prompt_tokens(self) -> int:
        """Tokens in the prompt."""
        return len(self.prompt_ids)


@dataclass(frozen=True)
class GenerationChunk:
    """New text of one request; `tokens` new tokens produced it; the last has a finish reason."""

    text: str
    tokens: int
    finish_reason: Literal["stop", "length"] | None = None


@runtime_checkable
class Engine(Protocol):
    """What every engine offers the gateway."""

    info: EngineInfo
    kind: Literal["generate", "proxy"]

    async def start(self) -> None:
        """Load the model or start the child process; returns once it can serve."""

    async def stop(self) -> None:
        """Release everything; in-flight requests end."""

    def ready(self) -> bool:
        """True once the model is loaded and the engine is serving."""

    def status(self) -> dict[str, Any]:
        """Health details for `/ready` (state, restarts, last error...)."""


@runtime_checkable
class GeneratingEngine(Engine, Protocol):
    """An in-process engine: the gateway renders the OpenAI bodies."""

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Render and tokenize the prompt and resolve `max_tokens`.

        The gateway calls it in a worker thread while the request holds an admission slot
        (tokenizing a long prompt takes seconds), so it must be thread-safe.

        Raises:
            OpenAIError: 400 when the prompt plus `max_tokens` exceeds the context length.
        """

    def generate(self, prepared: PreparedRequest) -> AsyncIterator[GenerationChunk]:
        """Yield text as it is decoded; closing the iterator cancels the request."""


@runtime_checkable
class ProxyEngine(Engine, Protocol):
    """An engine that speaks the OpenAI API itself (vLLM); the gateway forwards to it."""

    async def send(self, path: str, body: dict[str, Any]) -> Any:
        """POST `body` to the engine's `path` and return the streamed `httpx.Response`."""

    async def engine_metrics(self) -> tuple[bytes, str]:
        """The engine's own Prometheus text (`vllm:*`) and its content type."""


def context_error_message(max_model_len: int, prompt_tokens: int, max_tokens: int) -> str:
    """The message vLLM and OpenAI use when a request does not fit the context."""
    return (
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in "
        "the completion). Please reduce the length of the messages or completion."
    )
