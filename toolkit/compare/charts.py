"""The two charts of a comparison: quality vs size, and French vs English per variant."""

from __future__ import annotations

import os
from pathlib import Path

from toolkit.compare.scoring import VariantScore


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def quality_vs_size(scores: list[VariantScore], path: Path) -> Path:
    """Perplexity (lower is better) and chrF against size on disk, one point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for score in scores:
        size_mb = score.size_bytes / 2**20
        left.scatter(size_mb, score.perplexity["overall"])
        left.annotate(score.name, (size_mb, score.perplexity["overall"]), fontsize=8)
        right.scatter(size_mb, score.chrf["overall"])
        right.annotate(score.name, (size_mb, score.chrf["overall"]), fontsize=8)
    left.set(xlabel="size on disk (MB)", ylabel="perplexity of reference answers (lower is better)",
             title="Perplexity vs size")
    right.set(xlabel="size on disk (MB)", ylabel="chrF of greedy answers (higher is better)",
              title="chrF vs size")
    _save(fig, path)
    plt.close(fig)
    return path


def french_vs_english(scores: list[VariantScore], path: Path) -> Path:
    """Per-language perplexity and chrF side by side, so a French-only loss shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in scores]
    x = range(len(scores))
    width = 0.38
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(scores) * 2), 4.2))
    for offset, lang in ((-width / 2, "fr"), (width / 2, "en")):
        left.bar([i + offset for i in x], [s.perplexity["by_language"].get(lang, 0) for s in scores],
                 width, label=lang)
        right.bar([i + offset for i in x], [s.chrf["by_language"].get(lang, 0) for s in scores],
                  width, label=lang)
    for axis, label in ((left, "perplexity (lower is better)"), (right, "chrF (higher is better)")):
        axis.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
        axis.set_ylabel(label)
        axis.legend()
    left.set_title("Perplexity, French vs English")
    right.set_title("chrF, French vs English")
    _save(fig, path)
    plt.close(fig)
    return path
