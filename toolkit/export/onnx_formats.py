"""The ONNX formats as registry entries, over the exporters in `toolkit.export`.

`onnx` is optimum-onnx's graph (`onnx.py`: `.venv-onnx`, external data, the transformers 4.x
config view); `onnx-int8` is onnxruntime-genai's builder graph (`onnx_genai.py`) with the
int8 settings of `onnx.py`; `onnx-int4` applies the measured 4-bit recipe (`onnx_int4.py`)
to the builder's fp32 graph, and `onnx-w8a8` its SmoothQuant W8A8 rewrite (`onnx_w8a8.py`).
This module adapts them to the registry's `(ctx, work) -> VariantResult` signature and
states the checks: `onnx` must match the merged PyTorch model's logits (a wrong rope_theta
passes optimum's own check but not this one); the quantized ones are judged by their
perplexity delta.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
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
    """int8 graph from onnxruntime-genai's model builder, with `onnx-int8`'s MatMulNBits settings.

    The builder's graph (fused GroupQueryAttention, KV cache updated in place) is what the
    ONNX engine decodes fastest (`benchmarks/onnx_decode.py`); optimum's fp32 graph
    quantized by `quantize_onnx_int8` holds the same int8 weights but copies the whole KV
    cache every step.
    """
    if ctx.merged_dir is None:
        raise RuntimeError("onnx-int8 starts from the merged folder; export merged first")
    from toolkit.export.onnx import INT8_REASON, INT8_SETTINGS
    from toolkit.export.onnx_genai import export_genai_onnx

    _, calibration = ctx.calibration()  # reported; weight-only int8 needs no calibration
    ctx.console.print("onnx-int8: building the GroupQueryAttention graph (onnxruntime-genai "
                      "model builder, int8 MatMulNBits)")
    facts = export_genai_onnx(ctx.merged_dir, work, "int8")
    warnings = [calibration["warning"]] if calibration.get("warning") else []
    return VariantResult(quantization={"method": "onnxruntime", "bits": 8, **INT8_SETTINGS,
                                       "reason": INT8_REASON, **facts},
                         calibration=calibration, warnings=warnings)


def export_onnx_int4(ctx: ExportContext, work: Path) -> VariantResult:
    """The measured 4-bit recipe (`onnx_int4`) over the builder's fp32 graph."""
    try:
        from toolkit.export import onnx_int4
    except ImportError as exc:
        raise ToolkitError(f"onnx-int4 is not available in this install ({exc})") from None

    def quantize(fp32: Path, texts: list[str]) -> dict[str, Any]:
        return onnx_int4.quantize_onnx_int4(fp32, work, texts, adapter_dir=ctx.source.adapter_dir)

    return _from_builder_fp32(ctx, work, ExportFormat.onnx_int4, quantize)


def export_onnx_w8a8(ctx: ExportContext, work: Path) -> VariantResult:
    """SmoothQuant W8A8 (`onnx_w8a8`) over the builder's fp32 graph, calibrated on our texts."""
    from toolkit.export import onnx_w8a8

    def quantize(fp32: Path, texts: list[str]) -> dict[str, Any]:
        return onnx_w8a8.quantize_onnx_w8a8(fp32, work, texts)

    return _from_builder_fp32(ctx, work, ExportFormat.onnx_w8a8, quantize)


def _from_builder_fp32(ctx: ExportContext, work: Path, fmt: ExportFormat,
                       quantize: Callable[[Path, list[str]], dict[str, Any]]) -> VariantResult:
    """Build onnxruntime-genai's fp32 graph in a scratch folder beside `work`, then `quantize`.

    Starting from the builder's fp32 GroupQueryAttention graph keeps `onnx-int8`'s graph and
    `genai_config.json`, so the engine decodes the result with the KV cache updated in place,
    as it does `onnx-int8`. The scratch folder is removed after. `quantize` returns the
    report's quantization facts (method and bits included).
    """
    if ctx.merged_dir is None:
        raise RuntimeError(f"{fmt} starts from the merged folder; export merged first")
    try:
        from toolkit.export.onnx_genai import export_genai_onnx
    except ImportError as exc:
        raise ToolkitError(f"{fmt} is not available in this install ({exc})") from None
    texts, calibration = ctx.calibration()
    scratch = Path(tempfile.mkdtemp(prefix=f".{fmt}-source{PARTIAL_MARK}{os.getpid()}-",
                                    dir=work.parent))
    try:
        ctx.console.print(f"{fmt}: building the fp32 GroupQueryAttention graph "
                          "(onnxruntime-genai model builder)")
        builder = export_genai_onnx(ctx.merged_dir, scratch / "fp32", "fp32")
        ctx.console.print(f"{fmt}: quantizing ({len(texts)} calibration examples "
                          f"{calibration['by_language']})")
        facts = quantize(scratch / "fp32", texts)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    warnings = [calibration["warning"]] if calibration.get("warning") else []
    return VariantResult(
        quantization={**facts,
                      "exporter": builder["exporter"], "graph": builder["graph"]},
        calibration=calibration, warnings=warnings)
