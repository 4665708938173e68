"""`toolkit serve`: an OpenAI-compatible gateway with metrics and feedback, over one engine.

Engines: vLLM (a child process, possibly from its own venv), or the embedded transformers and
ONNX Runtime engines (continuous batching in-process). See `app.build_app` for the routes.
"""

from __future__ import annotations

from typing import Any

from toolkit.serve.settings import EngineChoice, ServeSettings

__all__ = ["EngineChoice", "ServeSettings", "build_app", "build_gateway", "run_server"]


def run_server(settings: ServeSettings) -> None:
    """Serve until SIGTERM (see `toolkit.serve.server.run_server`)."""
    from toolkit.serve.server import run_server as _run

    _run(settings)


def build_gateway(settings: ServeSettings) -> Any:
    """The gateway app for `settings`, engine chosen but not started."""
    from toolkit.serve.server import build_gateway as _build

    return _build(settings)


def build_app(*args: Any, **kwargs: Any) -> Any:
    """See `toolkit.serve.app.build_app` (imported lazily: fastapi is not needed for --help)."""
    from toolkit.serve.app import build_app as _build

    return _build(*args, **kwargs)
