"""`toolkit compare`: score each variant in its own process, then write JSON, Markdown, charts.

The report folder is written through `atomic.atomic_dir` (a temporary sibling renamed into
place when complete, the old report restored if that fails), so an interrupted comparison
leaves the previous report intact.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from toolkit.atomic import atomic_dir
from toolkit.compare.charts import french_vs_english, quality_vs_size
from toolkit.compare.scoring import VariantScore, score_variant
from toolkit.data.schema import load_examples
from toolkit.errors import ToolkitError
from toolkit.processes import bind_to_parent


def _score_in_child(spec: str, data: Path, system_prompt: str | None, max_new_tokens: int,
                    threads: int) -> VariantScore:
    context = multiprocessing.get_context("spawn")
    # same process group as ours (Ctrl-C reaches it), but dies with us on a SIGKILL
    with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=bind_to_parent,
                             initargs=(os.getpid(),)) as pool:
        return pool.submit(score_variant, spec, data, system_prompt, max_new_tokens,
                           threads).result()


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(scores: list[VariantScore]) -> str:
    """The comparison as a Markdown table (what compare.md holds)."""
    header = ("| variant | format | size MB | ppl | ppl fr | ppl en | chrF | chrF fr | chrF en "
              "| tok/s | peak RSS MB |")
    lines = [header, "|" + "---|" * 11]
    for s in scores:
        ppl, chrf = s.perplexity, s.chrf
        lines.append(
            f"| {s.name} | {s.format} | {s.size_bytes / 2**20:.0f} | {_fmt(ppl['overall'])} "
            f"| {_fmt(ppl['by_language'].get('fr'))} | {_fmt(ppl['by_language'].get('en'))} "
            f"| {_fmt(chrf['overall'], 1)} | {_fmt(chrf['by_language'].get('fr'), 1)} "
            f"| {_fmt(chrf['by_language'].get('en'), 1)} | {_fmt(s.tokens_per_s, 1)} "
            f"| {s.peak_rss_bytes / 2**20:.0f} |"
        )
    categories = sorted({c for s in scores for c in s.chrf["by_category"]})
    lines += ["", "Per category (ppl / chrF):", "",
              "| variant | " + " | ".join(categories) + " |",
              "|---|" + "---|" * len(categories)]
    for s in scores:
        cells = [f"{_fmt(s.perplexity['by_category'].get(c))} / "
                 f"{_fmt(s.chrf['by_category'].get(c), 1)}" for c in categories]
        lines.append(f"| {s.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _rich_table(scores: list[VariantScore]) -> Table:
    table = Table(title="toolkit compare (held-out split)")
    for column in ("variant", "format", "MB", "ppl", "ppl fr", "ppl en", "chrF", "chrF fr",
                   "chrF en", "tok/s", "peak MB"):
        table.add_column(column, justify="left" if column in ("variant", "format") else "right")
    for s in scores:
        table.add_row(
            s.name, s.format, f"{s.size_bytes / 2**20:.0f}", _fmt(s.perplexity["overall"]),
            _fmt(s.perplexity["by_language"].get("fr")), _fmt(s.perplexity["by_language"].get("en")),
            _fmt(s.chrf["overall"], 1), _fmt(s.chrf["by_language"].get("fr"), 1),
            _fmt(s.chrf["by_language"].get("en"), 1), _fmt(s.tokens_per_s, 1),
            f"{s.peak_rss_bytes / 2**20:.0f}",
        )
    return table


def run_compare(variants: list[str], *, data: Path, out: Path, max_new_tokens: int = 64,
                overwrite: bool = False, threads: int = 1, system_prompt: str | None = None,
                console: Console | None = None) -> list[VariantScore]:
    """Score every variant on `data` and write compare.json, compare.md and two PNG charts.

    Each variant is prompted with the system prompt it was trained with (its run manifest or
    export report; the training default for a base model) unless `system_prompt` is given,
    which then applies to all. compare.json records the prompt used per variant.

    Raises:
        ToolkitError: no variants, an existing report folder without `overwrite`, or a bad
            data file (checked before any model is loaded).
    """
    console = console or Console()
    if not variants:
        raise ToolkitError("compare: name at least one variant (model source, run or export)")
    if out.exists() and not overwrite:
        raise ToolkitError(f"{out}: report folder exists; pass --overwrite to replace it")
    load_examples(data)

    scores = []
    with console.status("") as status:
        for index, spec in enumerate(variants, start=1):
            status.update(f"compare: scoring {spec} ({index}/{len(variants)})")
            scores.append(_score_in_child(spec, data, system_prompt, max_new_tokens, threads))
            console.print(f"scored {spec} in {scores[-1].seconds:.0f} s")

    with atomic_dir(out, overwrite=True) as tmp:  # existence was checked before scoring
        payload: dict[str, Any] = {
            "data": str(data), "max_new_tokens": max_new_tokens, "threads": threads,
            "system_prompt": system_prompt, "variants": [s.to_dict() for s in scores],
        }
        (tmp / "compare.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False))
        (tmp / "compare.md").write_text(markdown_table(scores))
        quality_vs_size(scores, tmp / "quality_vs_size.png")
        french_vs_english(scores, tmp / "fr_vs_en.png")
    console.print(_rich_table(scores))
    console.print(f"wrote {out}/compare.json, compare.md, quality_vs_size.png, fr_vs_en.png")
    return scores
