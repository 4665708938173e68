"""The embedded ONNX Runtime engine for the `onnx*` exports.

The session (`runtime.onnx_model.OnnxCausalLM`) and its batched step (`runtime.onnx_steps.
step_backend`: `SharedKvStepBackend` for a GroupQueryAttention graph from onnxruntime-genai's
builder, KV updated in place; `OrtStepBackend` for optimum's graph) are the runtime's, shared
with export verification and compare; this module wires them into an `EmbeddedEngine`.
onnxruntime-gpu's CUDA provider is used when it is installed. A served model lives as long as
the server, so its weights are moved into huge pages once loaded (`runtime.huge_pages`: a
faster decode step); the short-lived loads of export checks and compare do not pay for it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from toolkit.runtime.facts import eos_token_ids
from toolkit.runtime.onnx_steps import providers, step_backend
from toolkit.runtime.speculation import NgramSpeculation
from toolkit.runtime.steps import StepBackend
from toolkit.serve.engines.base import EngineInfo
from toolkit.serve.engines.embedded import EmbeddedEngine

log = logging.getLogger("toolkit.serve")


def build_onnx_engine(info: EngineInfo, path: Path, max_batch: int, threads: int | None,
                      prefix_cache_bytes: int = 0,
                      speculation: NgramSpeculation | None = None) -> EmbeddedEngine:
    """An `EmbeddedEngine` that opens the ONNX export when started.

    Args:
        prefix_cache_bytes: budget of the prompt-prefix KV cache (`runtime.prefix_cache`) of a
            builder graph; 0 prefills every prompt whole.
        speculation: how greedy requests' drafts are looked up (`runtime.speculation`);
            builder graphs only (their backend feeds rows several tokens), None: off.

    Raises (at start):
        MissingExtraError: onnxruntime is not installed (pip install 'toolkit[onnx]').
    """

    def load() -> tuple[Any, StepBackend, frozenset[int]]:
        from toolkit.extras import require
        from toolkit.runtime.huge_pages import back_with_huge_pages
        from toolkit.runtime.loading import generation_config, load_tokenizer
        from toolkit.runtime.onnx_model import OnnxCausalLM

        require("onnxruntime", "--engine onnxruntime")
        lm = OnnxCausalLM.from_dir(path, threads=threads, providers=providers())
        pages = back_with_huge_pages()
        log.info("%s: weights in huge pages: %d MB (%s)", path, pages.huge_mb, pages.reason)
        tokenizer = load_tokenizer(path)
        eos = eos_token_ids(tokenizer, generation_config(path))
        # the KV buffers hold the served context: nothing longer is admitted (EmbeddedEngine)
        return tokenizer, step_backend(lm, capacity=info.max_model_len,
                                       prefix_cache_bytes=prefix_cache_bytes), frozenset(eos)

    return EmbeddedEngine(info, load, max_batch, speculation=speculation)
