"""`toolkit serve`: resolve the model, pick the engine, run the gateway under uvicorn.

Graceful shutdown on SIGTERM/SIGINT: `/ready` turns 503 at once (load balancers stop sending),
uvicorn stops accepting connections and lets in-flight requests finish for up to
`shutdown_timeout_s`, then the engine stops (vLLM's process group gets SIGTERM). Generations
still running at that timeout are cut by the gateway itself (`Gateway.cut`) with an OpenAI
error; uvicorn's own deadline comes `CUT_GRACE_S` later, only as a backstop, because its
cancellation answers a plain-text 500 or drops a stream without `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.serve.settings import EngineChoice, ServeSettings

log = logging.getLogger("toolkit.serve")
#: seconds between the gateway cutting in-flight generations and uvicorn cancelling what is left:
#: time enough for the cut requests to send their error and close their connections
CUT_GRACE_S = 2.0


def build_gateway(settings: ServeSettings) -> Any:
    """The FastAPI app for `settings`: model resolved, engine chosen (and logged), not started.

    Raises:
        ModelSourceError: nothing servable at `settings.model`.
        ConfigError: an engine that cannot serve that model.
    """
    from prometheus_client import CollectorRegistry

    from toolkit.feedback.store import FeedbackStore
    from toolkit.monitoring.metrics import GatewayMetrics
    from toolkit.serve.app import build_app
    from toolkit.serve.engines import build_engine
    from toolkit.serve.select import (
        choose_engine,
        default_feedback_db,
        log_choice,
        resolve_served_model,
        warn_inexact_vllm,
    )

    served = resolve_served_model(settings.model, settings.model_name)
    choice, reason = choose_engine(settings, served)
    log_choice(choice, reason, served)
    if choice == EngineChoice.vllm:
        warn_inexact_vllm(settings, served)
    if settings.engine_args and choice != EngineChoice.vllm:
        log.warning("ignoring the extra arguments %s: they pass through to vLLM only",
                    settings.engine_args)
    engine = build_engine(settings, served, choice)
    store = FeedbackStore(settings.feedback_db or default_feedback_db())
    return build_app(settings, engine, GatewayMetrics(CollectorRegistry()), store)


def make_server(app: Any, settings: ServeSettings, log_level: str = "info") -> Any:
    """A uvicorn server whose exit handler marks the gateway as draining first."""
    import uvicorn

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=log_level,
        timeout_graceful_shutdown=settings.shutdown_timeout_s + CUT_GRACE_S,  # type: ignore[arg-type]
        timeout_keep_alive=5, access_log=False, lifespan="on",
    )

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.gateway.draining = True
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            cut = asyncio.get_running_loop().call_later(settings.shutdown_timeout_s,
                                                        app.state.gateway.cut.set)
            try:
                await super().shutdown(sockets)
            finally:
                cut.cancel()

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after its graceful shutdown, so the process would
            # die "killed by SIGTERM"; a drained gateway exits 0 instead
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return _Server(config)


def listening_line(host: str, port: int, model: str, engine: str) -> str:
    """The one line that tells a user where to point an OpenAI client.

    `port` is the bound one (`--port 0` picks a free port); an IPv6 host gets the brackets a
    URL needs.
    """
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"listening on http://{shown}:{port}/v1 (model {model}, engine {engine})"


def warn_if_open(settings: ServeSettings) -> bool:
    """Warn when the gateway listens beyond this machine without an API key.

    Serving the network without a key is sometimes meant (a private subnet, a proxy that
    authenticates), so it is allowed, but never silently: anyone who can reach the port can
    query the model and rate its answers.

    Returns:
        Whether it warned.
    """
    if settings.api_key or _is_loopback(settings.host):
        return False
    log.warning("--host %s listens beyond this machine and no API key is set: anyone who can "
                "reach port %s can use the model; pass --api-key-file or $TOOLKIT_API_KEY",
                settings.host, settings.port)
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def run_server(settings: ServeSettings) -> None:
    """Serve until SIGTERM/SIGINT.

    Raises:
        ToolkitError: the engine failed to start (the message says why).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warn_if_open(settings)
    app = build_gateway(settings)
    server = make_server(app, settings)
    # an engine that cannot start ends the server, so `toolkit serve` exits non-zero
    app.state.gateway.on_engine_failed = lambda: setattr(server, "should_exit", True)
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        raise ToolkitError(f"--host {settings.host} --port {settings.port}: cannot bind ({exc}); "
                           "pick another port") from None
    info = app.state.gateway.info
    log.info("%s", listening_line(settings.host, sock.getsockname()[1], info.model_name,
                                  info.engine))
    server.run(sockets=[sock])
    error = app.state.gateway.engine_error
    if error:
        raise ToolkitError(f"the {app.state.gateway.info.engine} engine failed to start: {error}")
