"""The engines behind the gateway, and the one registry that builds them by name.

Each builder imports its backend lazily: choosing `transformers` never imports onnxruntime, and
the vLLM engine imports no vLLM at all (it runs in a child process, often in another venv).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from toolkit.formats import ExportFormat
from toolkit.serve.engines.base import (
    Engine,
    EngineInfo,
    GeneratingEngine,
    GenerationChunk,
    GenerationRequest,
    PreparedRequest,
    ProxyEngine,
    SamplingParams,
)
from toolkit.serve.select import ServedModel, vllm_python
from toolkit.serve.settings import EngineChoice, ServeSettings

__all__ = [
    "ENGINE_BUILDERS",
    "Engine",
    "EngineInfo",
    "GeneratingEngine",
    "GenerationChunk",
    "GenerationRequest",
    "PreparedRequest",
    "ProxyEngine",
    "SamplingParams",
    "build_engine",
    "engine_info",
]


def engine_info(settings: ServeSettings, served: ServedModel, engine: EngineChoice) -> EngineInfo:
    """The `EngineInfo` of a resolved model under an engine."""
    return EngineInfo(
        model_name=served.name, format=served.format, quantization=served.quantization,
        engine=engine.value, max_model_len=served.context_length(settings.max_model_len),
        path=str(served.adapter or served.path),
    )


def _transformers(settings: ServeSettings, served: ServedModel) -> Engine:
    from toolkit.serve.engines.transformers_engine import build_transformers_engine

    fmt = served.spec.format if served.spec is not None else ExportFormat.merged
    return build_transformers_engine(
        engine_info(settings, served, EngineChoice.transformers), served.path, served.adapter,
        served.tokenizer_dir, fmt, settings.batch_rows, settings.engine_threads,
    )


def _onnxruntime(settings: ServeSettings, served: ServedModel) -> Engine:
    from toolkit.runtime.speculation import NgramSpeculation
    from toolkit.serve.engines.onnx_engine import build_onnx_engine

    return build_onnx_engine(engine_info(settings, served, EngineChoice.onnxruntime), served.path,
                             settings.batch_rows, settings.engine_threads,
                             prefix_cache_bytes=settings.prefix_cache_mb << 20,
                             speculation=NgramSpeculation(settings.speculative_tokens))


def _vllm(settings: ServeSettings, served: ServedModel) -> Engine:
    from toolkit.serve.engines.vllm_engine import VllmEngine
    from toolkit.serve.engines.vllm_flags import vllm_args, vllm_env

    python = vllm_python(settings) or Path(sys.executable)

    def build_args(port: int, scratch: Path) -> list[str]:
        return vllm_args(settings, served, port, template_dir=scratch)

    return VllmEngine(
        engine_info(settings, served, EngineChoice.vllm), build_args, python,
        settings.vllm_module, vllm_env(ray_address=settings.ray_address),
        startup_timeout_s=settings.startup_timeout_s,
        max_restarts=settings.max_restarts,
    )


#: engine name -> builder; `auto` is resolved by `select.choose_engine` before this
ENGINE_BUILDERS: dict[EngineChoice, Callable[[ServeSettings, ServedModel], Engine]] = {
    EngineChoice.transformers: _transformers,
    EngineChoice.onnxruntime: _onnxruntime,
    EngineChoice.vllm: _vllm,
}


def build_engine(settings: ServeSettings, served: ServedModel, engine: EngineChoice) -> Engine:
    """Build (not start) the engine named `engine` for `served`."""
    return ENGINE_BUILDERS[engine](settings, served)
