"""What every exporter receives and returns (the registry's function signature).

An exporter is `(ctx: ExportContext, work: Path) -> VariantResult`: it writes the format's
files into `work` (a temporary folder that becomes the export only once verified) and
returns the settings it chose; the runner then reloads, scores and reports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from toolkit.export.registry import ExportFormat, MergeDtype
from toolkit.export.source import ExportSource


@dataclass
class ExportContext:
    """Inputs shared by the exporters of one `toolkit export` command.

    Attributes:
        source: the run or adapter being exported.
        dtype: the merged weights' dtype (quantized formats keep it for unquantized tensors).
        out: the parent folder of the export folders.
        calibration_path: the calibration JSONL (the project's own FR/EN training examples).
        console: where progress and notes go.
        merged_dir: the verified merged folder, once produced (every quantized format
            starts from it).
        produced: formats already committed by this command -> their folder (onnx-int8
            reuses the onnx export when both are asked for).
        verify_prompts: held-out token ids on which logits are compared.
        reference: the merged model's perplexity, logits on `verify_prompts` and fp16 size,
            once measured (the runner's `_Reference`).
        vllm_proof: load each vLLM-servable format in real vLLM and generate (`--vllm-proof`).
    """

    source: ExportSource
    dtype: MergeDtype
    out: Path
    calibration_path: Path | None
    console: Console
    merged_dir: Path | None = None
    produced: dict[ExportFormat, Path] = field(default_factory=dict)
    verify_prompts: list[list[int]] = field(default_factory=list)
    reference: Any = None
    vllm_proof: bool = False
    _calibration: tuple[list[str], dict[str, Any]] | None = None

    def calibration(self) -> tuple[list[str], dict[str, Any]]:
        """Rendered calibration texts and their description (loaded once per command)."""
        if self._calibration is None:
            from toolkit.export.calibration import calibration_texts
            from toolkit.runtime.loading import load_tokenizer as _load_tokenizer

            if self.calibration_path is None:
                from toolkit.errors import DataError

                raise DataError("no calibration data: pass --calibration data/train.jsonl")
            if self.merged_dir is None:
                raise RuntimeError("calibration needs the merged folder (its tokenizer)")
            tokenizer = _load_tokenizer(self.merged_dir)
            self._calibration = calibration_texts(self.calibration_path, tokenizer,
                                                  self.source.system_prompt)
        return self._calibration


@dataclass
class VariantResult:
    """What an exporter reports back.

    Attributes:
        quantization: the report's quantization block ({method, bits, ...settings, reason}).
        verification: format-specific checks to merge into the report's verification block
            (e.g. the merge's in-memory logit difference).
        warnings: notes for the report and the model card.
        calibration: the calibration description when the format used calibration data.
        loaded: the reloaded export when the exporter already opened it (saves a load).
        reference_logits: logits the reloaded export must match (merged: the rounded merged
            model; None: compare with the merged reference, informational for quantized).
        tolerance: the max |logit diff| allowed against that reference (None: not enforced;
            the perplexity delta is the check).
    """

    quantization: dict[str, Any]
    verification: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    loaded: Any = None
    reference_logits: list[Any] | None = None
    reference_name: str | None = None
    tolerance: float | None = None
