"""Counts and shares of a data set by language and category (the seed's balance figures)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from toolkit.data.schema import CATEGORIES, LANGUAGES, Example


@dataclass
class DataStats:
    """Balance of a data set; `token_percentiles` is filled only when a tokenizer is given."""

    total: int
    by_language: dict[str, int]
    by_category: dict[str, int]
    by_language_category: dict[str, dict[str, int]]
    token_percentiles: dict[str, int] = field(default_factory=dict)

    def share(self, count: int) -> float:
        """Percentage of the total, rounded to one decimal like the seed's figures."""
        return round(100.0 * count / self.total, 1) if self.total else 0.0


def compute_stats(examples: list[Example], token_lengths: list[int] | None = None) -> DataStats:
    """Tally examples by language and category; percentiles of token lengths when given."""
    by_language = Counter(e.language for e in examples)
    by_category = Counter(e.category for e in examples)
    cross = {
        lang: {cat: sum(1 for e in examples if e.language == lang and e.category == cat)
               for cat in CATEGORIES}
        for lang in LANGUAGES
    }
    stats = DataStats(
        total=len(examples),
        by_language={lang: by_language.get(lang, 0) for lang in LANGUAGES},
        by_category={cat: by_category.get(cat, 0) for cat in CATEGORIES},
        by_language_category=cross,
    )
    if token_lengths:
        ordered = sorted(token_lengths)
        for pct in (50, 90, 95, 99, 100):
            index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
            stats.token_percentiles[f"p{pct}"] = ordered[index]
    return stats
