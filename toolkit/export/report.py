"""The quality report of an export on screen and on disk: the table, and the writer that puts
`ExportReport` (defined in `toolkit.artifacts`, the contract with serve and compare) and its
model card into the folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toolkit.artifacts import ExportReport, write_export

CARD_NAME = "README.md"
TABLE_WIDTH = 140


def write_report(report: ExportReport, folder: Path) -> tuple[Path, Path]:
    """Write `export_report.json` and the model card `README.md` into `folder`."""
    from toolkit.export.card import model_card

    report_path = write_export(folder, report)
    card_path = Path(folder) / CARD_NAME
    card_path.write_text(model_card(report), encoding="utf-8")
    return report_path, card_path


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
