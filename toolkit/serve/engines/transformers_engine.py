"""The embedded transformers engine: any HF folder, a bnb/GPTQ export, or base + LoRA adapter.

Loading (`runtime.loading`) and the batched step (`runtime.torch_steps.TorchStepBackend`) are
the runtime's, shared with export verification and compare; this module wires them into an
`EmbeddedEngine`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from toolkit.formats import ExportFormat
from toolkit.runtime.facts import eos_token_ids, pad_token_id
from toolkit.runtime.torch_steps import TorchStepBackend
from toolkit.serve.engines.base import EngineInfo
from toolkit.serve.engines.embedded import EmbeddedEngine

log = logging.getLogger("toolkit.serve")


def load_transformers(path: Path, adapter: Path | None, tokenizer_dir: Path | None,
                      fmt: ExportFormat = ExportFormat.merged) -> tuple[Any, Any]:
    """Tokenizer and model for serving, loaded by `toolkit.runtime` (the code export measured
    with): fp32 compute on a CPU, the saved dtype on CUDA, a LoRA adapter merged in memory."""
    from toolkit.runtime.loading import load_tokenizer, load_transformers_model

    model = load_transformers_model(path, fmt, adapter=adapter)
    return load_tokenizer(tokenizer_dir or path), model


def build_transformers_engine(info: EngineInfo, path: Path, adapter: Path | None,
                              tokenizer_dir: Path | None, fmt: ExportFormat, max_batch: int,
                              threads: int | None) -> EmbeddedEngine:
    """An `EmbeddedEngine` that loads the model with transformers when started."""

    def set_threads() -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)

    def load() -> tuple[Any, TorchStepBackend, frozenset[int]]:
        set_threads()
        tokenizer, model = load_transformers(path, adapter, tokenizer_dir, fmt)
        backend = TorchStepBackend(model, pad_token_id(tokenizer))
        return tokenizer, backend, frozenset(eos_token_ids(tokenizer, model.generation_config))

    return EmbeddedEngine(info, load, max_batch, on_thread_start=set_threads)
