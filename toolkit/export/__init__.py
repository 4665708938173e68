"""Export stage: a fine-tune (run or adapter) to merged / bitsandbytes / GPTQ / ONNX folders,
each verified against its reference and described by `export_report.json` + a model card.

Importing this package loads no torch: `run_export` and `load_export` import what they need
when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from toolkit.export.registry import ExportFormat, MergeDtype

if TYPE_CHECKING:
    from toolkit.export.runner import ExportResult
    from toolkit.runtime.loading import LoadedExport

__all__ = ["ExportFormat", "ExportResult", "LoadedExport", "MergeDtype", "load_export",
           "run_export"]


def run_export(*args: Any, **kwargs: Any) -> ExportResult:
    """See `toolkit.export.runner.run_export`."""
    from toolkit.export.runner import run_export as _run

    return _run(*args, **kwargs)


def load_export(*args: Any, **kwargs: Any) -> LoadedExport:
    """See `toolkit.runtime.loading.load_export` (export verifies through the runtime)."""
    from toolkit.runtime.loading import load_export as _load

    return _load(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "LoadedExport":
        from toolkit.runtime.loading import LoadedExport

        return LoadedExport
    if name == "ExportResult":
        from toolkit.export.runner import ExportResult

        return ExportResult
    raise AttributeError(f"module 'toolkit.export' has no attribute {name!r}")
