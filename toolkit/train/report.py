"""The end-of-run summary: held-out perplexity before and after, and what the run cost."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _ppl(metrics: dict[str, Any] | None, language: str | None = None) -> str:
    if not metrics:
        return "-"
    value = metrics["overall"] if language is None else metrics["by_language"].get(language)
    return "-" if value is None else f"{value:.2f}"


def _bytes(count: int | None) -> str:
    if not count:
        return "-"
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def summary_table(manifest: dict[str, Any]) -> Table:
    """Before/after held-out perplexity (overall, fr, en) and the run's figures."""
    before, after = manifest["metrics"]["before"], manifest["metrics"]["after"]
    table = Table(title="training summary", title_justify="left")
    table.add_column("held-out (answers only)")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("perplexity", _ppl(before), _ppl(after))
    for language in ("fr", "en"):
        table.add_row(f"perplexity {language}", _ppl(before, language), _ppl(after, language))
    table.add_row("loss", f"{before['loss']:.4f}" if before else "-",
                  f"{after['loss']:.4f}" if after else "-")
    last = manifest["metrics"]["epochs"][-1] if manifest["metrics"]["epochs"] else None
    train_loss = last.get("train_loss") if last else None
    table.add_section()
    device = manifest["device"]
    facts = [
        ("steps", str(manifest["steps"])),
        ("train loss (last epoch)", f"{train_loss:.4f}" if train_loss is not None else "-"),
        ("tokens/s", f"{manifest['tokens_per_s']:,.0f} ({manifest['train_tokens']:,} tokens)"),
        ("wall time", f"{manifest['wall_time_s']:.1f} s (training {manifest['train_time_s']:.1f} s)"),
        ("peak memory", _bytes(manifest["peak_memory_bytes"])),
        ("truncated examples", str(manifest["truncated_examples"])),
        ("device", f"{device['type']} x{manifest['world_size']}, {device['precision']}"
                   + (f", {device['threads']} threads" if device["threads"] else "")),
    ]
    for name, value in facts:
        table.add_row(name, "", value)
    return table


def print_summary(console: Console, manifest: dict[str, Any], run_dir: str) -> None:
    """Print the summary table and where the run is."""
    console.print(summary_table(manifest))
    console.print(f"run: {run_dir} (adapter: {run_dir}/{manifest['adapter_dir']})",
                  highlight=False)
