"""`toolkit serve`: an OpenAI-compatible gateway with metrics and feedback, over one engine.

Engines: vLLM (a child process, possibly from its own venv), or the embedded transformers and
ONNX Runtime engines (continuous batching in-process). See `app.build_app` for the routes.

The CLI imports `ServeSettings` from here for its option defaults, so the functions are the
real ones of their modules, imported on first access (PEP 562): fastapi and the engines load
only when something serves.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from toolkit.serve.settings import EngineChoice, ServeSettings

if TYPE_CHECKING:
    from toolkit.serve.app import build_app
    from toolkit.serve.server import build_gateway, run_server

__all__ = ["EngineChoice", "ServeSettings", "build_app", "build_gateway", "run_server"]

_LAZY = {"run_server": "toolkit.serve.server", "build_gateway": "toolkit.serve.server",
         "build_app": "toolkit.serve.app"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'toolkit.serve' has no attribute {name!r}")
