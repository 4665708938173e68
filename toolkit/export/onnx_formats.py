"""`onnx` and `onnx-int8` as registry entries, over the exporter in `toolkit.export.onnx`.

The export itself (optimum-onnx in `.venv-onnx`, external data, the transformers 4.x config
view) and the int8 settings live in `onnx.py`; this module adapts them to the registry's
`(ctx, work) -> VariantResult` signature, reuses the fp32 export when both formats are asked
for, and states the checks: `onnx` must match the merged PyTorch model's logits (a wrong
rope_theta passes optimum's own check but not this one); `onnx-int8` is judged by its
perplexity delta.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from toolkit.atomic import PARTIAL_MARK
from toolkit.errors import ToolkitError
from toolkit.export.context import ExportContext, VariantResult
from toolkit.export.registry import ExportFormat

#: ONNX Runtime vs PyTorch, relative to the logit scale (fused kernels differ ~1e-5 of it)
ONNX_REL_TOL = 1e-3


def _onnx_module() -> Any:
    try:
        from toolkit.export import onnx as onnx_module
    except ImportError as exc:
        raise ToolkitError(f"ONNX export is not available in this install ({exc})") from None
    return onnx_module


def export_onnx_fp32(ctx: ExportContext, work: Path) -> VariantResult:
    """optimum-onnx export of the merged folder, with past key values."""
    if ctx.merged_dir is None:
        raise RuntimeError("onnx starts from the merged folder; export merged first")
    ctx.console.print("onnx: exporting with optimum-onnx (text-generation-with-past)")
    facts = _onnx_module().export_onnx(ctx.merged_dir, work)
    return VariantResult(
        quantization={"method": "none", "bits": None, **facts},
        reference_name="merged model (PyTorch, fp32 compute)",
        tolerance=None,  # set by the runner from the reference logits' scale
    )


def export_onnx_int8(ctx: ExportContext, work: Path) -> VariantResult:
    """ONNX Runtime int8 quantization of the fp32 ONNX export (reused when already made)."""
    module = _onnx_module()
    quantize = getattr(module, "quantize_onnx_int8", None)
    if quantize is None:
        raise ToolkitError("onnx-int8: toolkit.export.onnx has no quantize_onnx_int8 in this "
                           "install; update the toolkit")
    texts, calibration = ctx.calibration()
    source = ctx.produced.get(ExportFormat.onnx)
    scratch: Path | None = None
    try:
        if source is None:
            scratch = Path(tempfile.mkdtemp(
                prefix=f".onnx-int8-source{PARTIAL_MARK}{os.getpid()}-", dir=work.parent))
            source = scratch / "onnx"
            ctx.console.print("onnx-int8: exporting the fp32 ONNX graph first")
            module.export_onnx(ctx.merged_dir, source)
        ctx.console.print(f"onnx-int8: quantizing ({len(texts)} calibration examples "
                          f"{calibration['by_language']})")
        facts = quantize(source, work, texts)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    warnings = [calibration["warning"]] if calibration.get("warning") else []
    return VariantResult(quantization={"method": "onnxruntime", "bits": 8, **(facts or {})},
                         calibration=calibration, warnings=warnings)
