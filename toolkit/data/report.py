"""Print a data set's balance as tables (what `toolkit data stats` shows)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from toolkit.data.schema import load_examples
from toolkit.data.stats import DataStats, compute_stats


def _token_lengths(path: Path, model: str) -> list[int]:
    from transformers import AutoTokenizer

    from toolkit.data.prompts import encode_examples, ensure_chat_template
    from toolkit.model_source import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model).path)
    ensure_chat_template(tokenizer)
    encoded = encode_examples(tokenizer, load_examples(path), None, max_seq_len=1 << 30)
    return [len(e.input_ids) for e in encoded]


def stats_for(path: Path, model: str | None = None) -> DataStats:
    """Balance of a valid data file, with token percentiles when a model source is given."""
    examples = load_examples(path)
    return compute_stats(examples, _token_lengths(path, model) if model else None)


def print_stats(path: Path, model: str | None, console: Console) -> DataStats:
    """Compute and print the balance tables of `path`."""
    stats = stats_for(path, model)
    table = Table(title=f"{path}: {stats.total} examples")
    table.add_column("group")
    table.add_column("value")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    for name, counts in (("language", stats.by_language), ("category", stats.by_category)):
        for value, count in counts.items():
            table.add_row(name, value, str(count), f"{stats.share(count):.1f} %")
    console.print(table)
    cross = Table(title="language x category")
    cross.add_column("language")
    for category in stats.by_category:
        cross.add_column(category, justify="right")
    for language, row in stats.by_language_category.items():
        cross.add_row(language, *(str(v) for v in row.values()))
    console.print(cross)
    if stats.token_percentiles:
        console.print("tokens per example: " + ", ".join(
            f"{k} {v}" for k, v in stats.token_percentiles.items()))
    return stats
