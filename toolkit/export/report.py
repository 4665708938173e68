"""The quality report of an export: `export_report.json`, a model card, and the table.

`export_report.json` is the contract with the next stages: serve reads `engine_hint`,
`vllm`, `dtype`, `max_model_len` and `system_prompt` to start an engine; compare reads
`format`, `size_bytes` and `max_model_len`. Its schema is `ExportReport`'s fields (version
`REPORT_VERSION`); every field is always present, `null` where it does not apply.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

REPORT_VERSION = 1
REPORT_NAME = "export_report.json"
CARD_NAME = "README.md"
TABLE_WIDTH = 140


@dataclass
class ExportReport:
    """Everything known about one export folder.

    Attributes:
        report_version: schema version of this file.
        format: the `ExportFormat` value.
        created: UTC ISO 8601 time the folder was committed.
        toolkit_version: the toolkit that wrote it.
        path: the export folder.
        source: {path, run_dir, adapter_dir, adapter_sha256, base_model{source, path,
            revision, kind}, qlora, compute_dtype}: what was exported.
        dtype: dtype of the unquantized tensors and of the activations to serve with
            ("float16"...; what vLLM's `--dtype` takes).
        quantization: {method: none|bitsandbytes|gptq|onnxruntime, bits, ...} with the
            settings the exporter chose and why.
        max_model_len: the model's context length (config max_position_embeddings).
        system_prompt: the training system prompt; serve renders it before user turns.
        size_bytes: every file in the folder (weights, tokenizer, configs) except this
            report and the model card.
        weights_bytes: the weight files only (.safetensors/.bin/.onnx/.onnx_data).
        fp16_reference_bytes: parameters of the merged model x 2 bytes.
        size_ratio: weights_bytes / fp16_reference_bytes.
        perplexity: {overall, fr, en, loss, tokens, by_language, by_category} on the
            held-out answers (prompt tokens are context, not scored).
        reference_perplexity: {overall, fr, en} of the merged model (the reference).
        perplexity_delta_pct: {overall, fr, en}: 100 * (ppl / reference - 1).
        quality: {target_delta_pct, within_target, verdict}: verdict is "reference",
            "ok" (within target), "degraded" (beyond it; the export is still usable).
        speed: {tokens_per_s, new_tokens, seconds, threads, engine}: greedy batch-1.
        verification: {passed, reference, max_abs_logit_diff, tolerance, prompts,
            generate_ok, sample, checks[], ...format-specific}.
        vllm: {loadable, quantization, reason, checked, version, device}.
        engine_hint: engines that can serve this folder here, best first
            ("vllm", "transformers", "onnxruntime").
        eval_data: {path, sha256, examples, by_language}.
        calibration: {path, sha256, examples, by_language} or null.
        export_seconds: wall time of this format (export + verification + measurement).
        versions: package versions that produced it.
        warnings: what a user should know (degraded quality, unloadable in vLLM...).
    """

    format: str
    path: str
    source: dict[str, Any]
    dtype: str
    quantization: dict[str, Any]
    max_model_len: int | None
    system_prompt: str | None
    size_bytes: int
    weights_bytes: int
    fp16_reference_bytes: int
    size_ratio: float
    perplexity: dict[str, Any]
    reference_perplexity: dict[str, Any]
    perplexity_delta_pct: dict[str, Any]
    quality: dict[str, Any]
    speed: dict[str, Any]
    verification: dict[str, Any]
    vllm: dict[str, Any]
    engine_hint: list[str]
    eval_data: dict[str, Any]
    calibration: dict[str, Any] | None
    export_seconds: float
    versions: dict[str, str | None]
    warnings: list[str] = field(default_factory=list)
    created: str = ""
    toolkit_version: str = ""
    report_version: int = REPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (NaN becomes null)."""
        return _clean(asdict(self))

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write `export_report.json` and the model card `README.md` into `folder`."""
        report_path = Path(folder) / REPORT_NAME
        report_path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n",
                               encoding="utf-8")
        from toolkit.export.card import model_card

        card_path = Path(folder) / CARD_NAME
        card_path.write_text(model_card(self), encoding="utf-8")
        return report_path, card_path


#: every key of export_report.json (tests and readers check against this)
REPORT_KEYS: tuple[str, ...] = tuple(f.name for f in fields(ExportReport))


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else float(f"{value:.7g}")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def delta_pct(value: float | None, reference: float | None) -> float | None:
    """100 * (value / reference - 1), or None when either is missing."""
    if value is None or reference is None or not reference or math.isnan(value):
        return None
    return 100.0 * (value / reference - 1.0)


def mb(count: int | None) -> str:
    """Bytes as megabytes for the table and the card ("-" when unknown)."""
    return "-" if count is None else f"{count / 1e6:,.1f} MB"


def num(value: Any, spec: str = ".2f") -> str:
    """A number for the table and the card ("-" when unknown)."""
    return "-" if value is None else format(value, spec)


def signed(value: Any) -> str:
    """A percentage delta with its sign ("-" when unknown)."""
    return "-" if value is None else f"{value:+.1f} %"


@dataclass
class TableRow:
    """One line of the printed table: a produced report, or a format that was not."""

    format: str
    report: ExportReport | None = None
    status: str = "ok"
    reason: str = ""


def print_table(rows: list[TableRow], console: Console, title: str = "export") -> Table:
    """The side-by-side table: size and ratio, perplexity (overall/fr/en) and delta, speed."""
    table = Table(title=title, show_lines=False, box=box.SIMPLE_HEAD)
    for header, justify in (("format", "left"), ("size", "right"), ("vs fp16", "right"),
                            ("ppl", "right"), ("fr", "right"), ("en", "right"),
                            ("Δ ppl", "right"), ("tok/s", "right"), ("time", "right")):
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("status", justify="left", overflow="fold")
    for row in rows:
        r = row.report
        if r is None:
            table.add_row(row.format, "-", "-", "-", "-", "-", "-", "-", "-",
                          f"[yellow]{row.status}[/yellow]: {escape(row.reason)}")
            continue
        delta = r.perplexity_delta_pct
        verdict = r.quality.get("verdict")
        color = {"ok": "green", "reference": "green", "degraded": "red"}.get(str(verdict), "white")
        status = f"[{color}]{verdict}[/{color}]"
        if row.status != "ok":
            status = f"{row.status} ({verdict})"
        table.add_row(
            row.format, mb(r.weights_bytes), f"{r.size_ratio:.0%}",
            num(r.perplexity.get("overall")), num(r.perplexity.get("fr")),
            num(r.perplexity.get("en")),
            "ref" if verdict == "reference" else signed(delta.get("overall")),
            num(r.speed.get("tokens_per_s"), ".1f"), f"{r.export_seconds:.0f} s", status,
        )
    if console.is_terminal:
        console.print(table)
        return table
    # a pipe or CI log has no width: rich would assume 80 columns and truncate the numbers
    saved = console.width
    console.width = max(saved, TABLE_WIDTH)
    try:
        console.print(table)
    finally:
        console.width = saved
    return table
