"""The gateway app factory: OpenAI-compatible routes in front of one engine.

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
`POST /v1/feedback`, `GET /health` (process alive), `GET /ready` (engine loaded; 503 while
loading, restarting or draining), `GET /metrics` (toolkit_* and process_* series) and, under
vLLM, `GET /metrics/engine` (vLLM's own `vllm:*` series, for Prometheus to scrape).

Every failure answers `{"error": {"message", "type", "param", "code"}}`; no request can make the
server answer 500 for its content. With an API key set, `/v1/*` needs `Authorization: Bearer KEY`
while `/health`, `/ready` and `/metrics*` stay open (probes and Prometheus carry no key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from toolkit.feedback.store import FeedbackStore
from toolkit.monitoring.metrics import GatewayMetrics, feedback_score01
from toolkit.serve.admission import Admission
from toolkit.serve.engines.base import Engine
from toolkit.serve.gateway import Gateway, parse_body
from toolkit.serve.lifecycle import body_deadline, report_status, reported_status
from toolkit.serve.protocol import FeedbackRequest, OpenAIError, error_body
from toolkit.serve.settings import ServeSettings

log = logging.getLogger("toolkit.serve")
#: path -> the bounded `endpoint` label of toolkit_requests_total
METRIC_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                    "/v1/models": "models", "/v1/feedback": "feedback"}
OPEN_PATHS = ("/health", "/ready", "/metrics", "/metrics/engine", "/docs", "/openapi.json")
#: status recorded for a request the client abandoned (nginx's "client closed request")
CLIENT_CLOSED = 499


def _error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class _RequestMetrics:
    """ASGI middleware: count every /v1 request by status and time it to its last byte.

    It also bounds the body upload (`body_timeout_s`, see `lifecycle.body_deadline`) and ends a
    request whose client left (`ClientDisconnect`, raised while reading the body or by
    `lifecycle.Stops`) quietly as 499: a client hanging up is not a server error, and
    a traceback per disconnect would bury the real ones.
    """

    def __init__(self, app: Any, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        endpoint = METRIC_ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = {"code": 0, "recorded": False}

        def record(code: int) -> None:
            state["recorded"] = True
            info = self.gateway.info
            self.gateway.metrics.request_finished(info.model_name, info.engine, endpoint, code,
                                                  time.perf_counter() - started)

        async def tracked_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                state["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # counted before the last byte leaves, so a client that reads /metrics right
                # after its answer always sees its own request
                record(reported_status(scope) or state["code"])
            await send(message)

        try:
            await self.app(scope, body_deadline(receive, self.gateway.settings.body_timeout_s),
                           tracked_send)
        except ClientDisconnect:
            log.info("%s %s: the client closed the connection before its answer (499)",
                     scope["method"], scope["path"])
            report_status(scope, CLIENT_CLOSED)
        finally:
            if not state["recorded"]:  # no response (500) or a stream the client abandoned
                record(reported_status(scope) or (CLIENT_CLOSED if state["code"] else 500))


def build_app(settings: ServeSettings, engine: Engine, metrics: GatewayMetrics | None = None,
              store: FeedbackStore | None = None, *, start_engine: bool = True) -> FastAPI:
    """The gateway over `engine` (started in the background on app startup).

    Args:
        settings: serve settings (auth, limits, recording).
        engine: a `GeneratingEngine` or a `ProxyEngine`.
        metrics: the sink; default: a new `GatewayMetrics` on its own registry.
        store: the feedback store; default: `settings.feedback_db` or `$TOOLKIT_HOME/feedback.db`.
        start_engine: start the engine on startup and stop it on shutdown (tests pass False
            for an engine they manage).
    """
    from toolkit.serve.select import default_feedback_db

    metrics = metrics or GatewayMetrics(CollectorRegistry())
    owns_store = store is None
    store = store or FeedbackStore(settings.feedback_db or default_feedback_db())
    info = engine.info
    metrics.set_model_info(info.model_name, info.format, info.quantization, info.engine)
    admission = Admission(
        settings.max_concurrency, settings.max_queue, settings.retry_after_s,
        on_running=lambda d: metrics.running(info.model_name, info.engine, d),
        on_waiting=lambda d: metrics.waiting(info.model_name, info.engine, d),
    )
    gateway = Gateway(settings, engine, metrics, store, admission)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_start(gateway)) if start_engine else None
        app.state.engine_task = task
        yield
        gateway.draining = True
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await engine.stop()
        if owns_store:
            store.close()

    app = FastAPI(title="toolkit gateway", version="1", lifespan=lifespan)
    app.state.gateway = gateway
    _add_error_handlers(app)
    _add_routes(app, gateway)
    app.add_middleware(_RequestMetrics, gateway=gateway)
    return app


async def _start(gateway: Gateway) -> None:
    try:
        await gateway.engine.start()
    except Exception as exc:  # noqa: BLE001 - any start failure is reported on /ready and ends the server
        gateway.engine_error = f"{type(exc).__name__}: {exc}"
        log.error("the engine failed to start: %s", gateway.engine_error)
        if gateway.on_engine_failed is not None:
            gateway.on_engine_failed()
        return
    log.info("ready: %s on the %s engine", gateway.info.model_name, gateway.info.engine)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        return _error_response(OpenAIError(400, str(first.get("msg", "invalid request"))))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        # uvicorn drops the connection after an unhandled error; saying so keeps a keep-alive
        # client from sending its next request into a closed socket
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"),
                            status_code=500, headers={"Connection": "close"})


def _check_key(gateway: Gateway, request: Request) -> None:
    key = gateway.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise OpenAIError(401, "missing or incorrect API key: send `Authorization: Bearer KEY`",
                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _engine_totals(status: dict[str, Any]) -> dict[str, int]:
    """The counters an embedded engine keeps, from its `status()` (what /ready shows): the
    onnxruntime engine's prefix cache and speculation; other engines report none of them."""
    totals = {}
    if cache := status.get("prefix_cache"):
        totals["toolkit_prefix_cache_queries"] = cache["prompt_tokens"]
        totals["toolkit_prefix_cache_hits"] = cache["tokens_reused"]
    if "draft_tokens" in status:
        totals["toolkit_spec_decode_draft_tokens"] = status["draft_tokens"]
        totals["toolkit_spec_decode_accepted_tokens"] = status["accepted_tokens"]
    return totals


def _add_routes(app: FastAPI, gateway: Gateway) -> None:
    from toolkit.serve.generation import handle_generation
    from toolkit.serve.proxy import handle_proxy

    handler = handle_proxy if gateway.engine.kind == "proxy" else handle_generation

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        _check_key(gateway, request)
        return await handler(gateway, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        _check_key(gateway, request)
        return await handler(gateway, request, "completions")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _check_key(gateway, request)
        info = gateway.info
        return {"object": "list", "data": [{
            "id": info.model_name, "object": "model", "created": gateway.started_at,
            "owned_by": "toolkit", "max_model_len": info.max_model_len,
            "format": info.format, "quantization": info.quantization, "engine": info.engine,
        }]}

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict[str, Any]:
        _check_key(gateway, request)
        _, body = await parse_body(request, FeedbackRequest, gateway)
        scale = body.resolved_scale()
        score = feedback_score01(body.rating, scale)
        stored = await asyncio.to_thread(gateway.store.add_feedback, body.completion_id,
                                         body.rating, scale, score, body.comment, body.correction)
        if stored is None:
            raise OpenAIError(404, f"no completion with id {body.completion_id!r} was served here",
                              param="completion_id", code="completion_not_found")
        gateway.metrics.feedback(gateway.info.model_name, body.rating, scale)
        return {"id": stored.feedback_id, "object": "feedback", "completion_id": body.completion_id,
                "rating": body.rating, "scale": scale, "score": score,
                "text_stored": stored.text_stored}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        engine = gateway.engine
        details = {"engine": gateway.info.engine, "model": gateway.info.model_name,
                   **engine.status(), "error": gateway.engine_error}
        if gateway.draining:
            return JSONResponse({"status": "draining", **details}, status_code=503)
        if engine.ready():
            return JSONResponse({"status": "ready", **details})
        return JSONResponse({"status": "not_ready", **details}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        gateway.metrics.engine_totals(gateway.info.model_name, gateway.info.engine,
                                      _engine_totals(gateway.engine.status()))
        body, content_type = gateway.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/metrics/engine")
    async def engine_metrics() -> Response:
        engine = gateway.engine
        if engine.kind != "proxy":
            raise OpenAIError(404, f"the {gateway.info.engine} engine runs in-process: its "
                              "numbers are in /metrics", type="not_found_error")
        if not engine.ready():
            raise OpenAIError(503, "the engine is not ready", type="server_error",
                              code="engine_not_ready")
        body, content_type = await engine.engine_metrics()  # type: ignore[attr-defined]
        return Response(body, media_type=content_type)
