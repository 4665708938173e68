"""The gateway's shared state and the helpers every route uses: body parsing, stats, recording."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from toolkit.feedback.store import FeedbackStore
from toolkit.monitoring.metrics import GatewayMetrics
from toolkit.serve.admission import Admission
from toolkit.serve.body import load_json, read_body
from toolkit.serve.engines.base import Engine, EngineInfo
from toolkit.serve.protocol import OpenAIError
from toolkit.serve.settings import ServeSettings

log = logging.getLogger("toolkit.serve")
M = TypeVar("M", bound=BaseModel)


@dataclass
class Gateway:
    """Everything a request handler needs, built once per app."""

    settings: ServeSettings
    engine: Engine
    metrics: GatewayMetrics
    store: FeedbackStore
    admission: Admission
    started_at: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    engine_error: str | None = None
    #: called when the engine fails to start (the server uses it to exit)
    on_engine_failed: Callable[[], None] | None = None
    #: set when the shutdown timeout ends: generations still running stop with an OpenAI error
    cut: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def info(self) -> EngineInfo:
        """What the engine serves."""
        return self.engine.info

    def observe(self, started: float, first_at: float | None, last_at: float | None,
                prompt_tokens: int, completion_tokens: int) -> None:
        """Turn one request's timings and counts into metrics (TTFT, TPOT, tokens)."""
        model, engine = self.info.model_name, self.info.engine
        if first_at is not None:
            self.metrics.first_token(model, engine, first_at - started)
        per_token = None
        if first_at is not None and last_at is not None and completion_tokens >= 2:
            per_token = (last_at - first_at) / (completion_tokens - 1)
        self.metrics.tokens(model, engine, prompt_tokens, completion_tokens, per_token)

    async def record(self, completion_id: str, endpoint: str, created: int,
                     metadata: dict[str, str] | None, prompt: Any, answer: str) -> None:
        """Store the completion id (and its text and metadata when `record_completions` is on).

        Request metadata is free-form client text, as likely to carry patient details as the
        prompt, so it follows the same switch.
        """
        keep = self.settings.record_completions
        try:
            await asyncio.to_thread(
                self.store.record_completion, completion_id, self.info.model_name, endpoint,
                created=float(created), metadata=metadata if keep else None,
                prompt=prompt if keep else None, answer=answer if keep else None,
            )
        except Exception:  # a full disk must not fail the answer the client already has
            log.exception("could not record completion %s", completion_id)


async def parse_body(request: Request, model: type[M], gateway: Gateway) -> tuple[dict[str, Any], M]:
    """The raw JSON object and its validated model.

    The JSON is decoded and checked in a worker thread: a body near the size limit made of
    many small values takes tens of milliseconds to walk, which must not stall other requests.

    Raises:
        OpenAIError: 413 for a body over `max_body_bytes`, 400 for malformed JSON or invalid
            fields, 404 for an unknown model.
    """
    body = await read_body(request, gateway.settings.max_body_bytes)
    raw = await asyncio.to_thread(load_json, body)
    if not isinstance(raw, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        parsed = model.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None
    requested = getattr(parsed, "model", None)
    if requested is not None and requested != gateway.info.model_name:
        raise OpenAIError(404, f"The model `{requested}` does not exist; this server serves "
                          f"`{gateway.info.model_name}` (see /v1/models).",
                          param="model", code="model_not_found")
    return raw, parsed


def validation_error(exc: ValidationError) -> OpenAIError:
    """A 400 naming every invalid field (the first one as `param`)."""
    errors = exc.errors()
    parts, first = [], None
    for error in errors:
        loc = ".".join(str(p) for p in error["loc"] if p not in ("body",))
        first = first or loc or None
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {message}" if loc else message)
    return OpenAIError(400, "; ".join(parts) or "invalid request", param=first)
