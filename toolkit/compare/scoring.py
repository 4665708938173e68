"""Score one variant: perplexity, chrF of greedy answers, speed, peak memory, size.

Each variant is scored in its own child process (spawned), so its peak resident memory is
its own and one variant's caches cannot flatter the next.
"""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toolkit.data.schema import Example


@dataclass
class VariantScore:
    """Everything `toolkit compare` reports about one variant."""

    name: str
    kind: str
    path: str
    format: str
    size_bytes: int
    system_prompt: str
    perplexity: dict[str, Any]
    chrf: dict[str, Any]
    tokens_per_s: float
    peak_rss_bytes: int
    seconds: float
    generations: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for compare.json."""
        return asdict(self)


def chrf_by_group(examples: list[Example], hypotheses: list[str]) -> dict[str, Any]:
    """Corpus chrF overall, per language and per category (sacrebleu's definition)."""
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    groups: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        groups[f"lang:{example.language}"].append(index)
        groups[f"cat:{example.category}"].append(index)

    def score(indices: list[int]) -> float:
        hyps = [hypotheses[i] for i in indices]
        refs = [[examples[i].output for i in indices]]
        return round(metric.corpus_score(hyps, refs).score, 2)

    return {
        "overall": score(list(range(len(examples)))),
        "by_language": {k[5:]: score(v) for k, v in sorted(groups.items()) if k.startswith("lang:")},
        "by_category": {k[4:]: score(v) for k, v in sorted(groups.items()) if k.startswith("cat:")},
    }


def score_variant(spec: str, data: Path, system_prompt: str | None, max_new_tokens: int,
                  threads: int) -> VariantScore:
    """Load a variant and measure it (runs inside a child process).

    Args:
        system_prompt: rendered before every example; None uses the one the variant was
            trained with (its manifest or export report), else the training default.
    """
    import torch

    from toolkit.compare.variants import open_variant
    from toolkit.data.prompts import chat_messages, encode_examples, render_prompt
    from toolkit.data.schema import load_examples
    from toolkit.evaluation import perplexity

    torch.set_num_threads(threads)
    start = time.perf_counter()
    variant = open_variant(spec)
    if system_prompt is None:
        system_prompt = variant.system_prompt
    if system_prompt is None:
        from toolkit.config import DataSection

        system_prompt = DataSection().system_prompt
    examples = load_examples(data)
    encoded = encode_examples(variant.tokenizer, examples, system_prompt, variant.max_len)
    ppl = perplexity(variant.logits_fn, encoded)

    hypotheses: list[str] = []
    new_tokens = 0
    gen_seconds = 0.0
    for example in examples:
        text = render_prompt(variant.tokenizer, chat_messages(example, system_prompt))
        ids = variant.tokenizer(text, add_special_tokens=False)["input_ids"]
        t0 = time.perf_counter()
        out = variant.generate(ids, max_new_tokens)
        gen_seconds += time.perf_counter() - t0
        new_tokens += len(out)
        hypotheses.append(variant.tokenizer.decode(out, skip_special_tokens=True).strip())
    return VariantScore(
        name=variant.name, kind=variant.kind, path=str(variant.path), format=variant.format,
        size_bytes=variant.size_bytes, system_prompt=system_prompt, perplexity=ppl.to_dict(),
        chrf=chrf_by_group(examples, hypotheses),
        tokens_per_s=round(new_tokens / gen_seconds, 2) if gen_seconds else 0.0,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        seconds=round(time.perf_counter() - start, 1),
        generations=[{"id": e.id, "language": e.language, "output": h}
                     for e, h in zip(examples, hypotheses)],
    )
