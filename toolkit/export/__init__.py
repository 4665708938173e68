"""Export stage: a fine-tune (run or adapter) to merged / bitsandbytes / GPTQ / ONNX folders,
each verified against its reference and described by `export_report.json` + a model card.

Importing this package loads no torch: the CLI parses `--quantize` with `ExportFormat` from
here, so `run_export`, `load_export` and their result types are the real objects of their
modules, imported on first access (PEP 562) rather than wrapped in `*args` trampolines.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from toolkit.export.registry import ExportFormat, MergeDtype

if TYPE_CHECKING:
    from toolkit.export.runner import ExportResult, run_export
    from toolkit.runtime.loading import LoadedExport, load_export

__all__ = ["ExportFormat", "ExportResult", "LoadedExport", "MergeDtype", "load_export",
           "run_export"]

_LAZY = {"run_export": "toolkit.export.runner", "ExportResult": "toolkit.export.runner",
         "load_export": "toolkit.runtime.loading", "LoadedExport": "toolkit.runtime.loading"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'toolkit.export' has no attribute {name!r}")
