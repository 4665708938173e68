"""The one way to open a model folder and generate from it, shared by export, compare and serve.

`facts` (EOS ids, pad id, context length) imports nothing heavy; `loading` opens any
export, plain model or base + adapter with one set of dtype/device rules; `steps` holds the
`StepBackend` protocol, the token rule (`sample_token`) and the greedy loop that runs on the
serving backends (`torch_steps`, `onnx_steps`); `onnx_model` is the ONNX Runtime causal LM. Export verifies with this code, compare scores
with it and the embedded serve engines load with it, so the numbers in an export report are
those of the code that serves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from toolkit.runtime.facts import DEFAULT_CONTEXT_LENGTH, context_length, eos_token_ids

if TYPE_CHECKING:
    from toolkit.runtime.loading import LoadedExport

__all__ = ["DEFAULT_CONTEXT_LENGTH", "LoadedExport", "context_length", "eos_token_ids",
           "load_export"]


def load_export(*args: Any, **kwargs: Any) -> LoadedExport:
    """See `toolkit.runtime.loading.load_export`."""
    from toolkit.runtime.loading import load_export as _load

    return _load(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "LoadedExport":
        from toolkit.runtime.loading import LoadedExport

        return LoadedExport
    raise AttributeError(f"module 'toolkit.runtime' has no attribute {name!r}")
