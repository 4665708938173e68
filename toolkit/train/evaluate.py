"""Held-out evaluation during training, sharded over the processes of a data-parallel run.

The numbers are those of `toolkit.evaluation.perplexity` (which export and compare use):
summed NLL of the answer tokens per example, pooled by tokens overall, per language and
per category; a test holds the two to 1e-4. Only the scoring is cheaper: the vocabulary
projection runs on answer positions alone (`logits_to_keep`), in torch, which matters when
it runs before training and after every epoch on a CPU. Every process runs the same
number of forward passes (sharded models need all ranks in each forward), then the
per-example results are gathered and pooled once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from toolkit.data.prompts import IGNORE_INDEX, EncodedExample
from toolkit.evaluation import Perplexity

#: one scored example: its position in the split, summed NLL, answer tokens
Scored = tuple[int, float, int]


def pool(examples: Sequence[EncodedExample], scored: Sequence[Scored]) -> Perplexity:
    """Pool per-example NLL into perplexity overall, per language and per category.

    Same pooling as `toolkit.evaluation.perplexity` (token-weighted), over results that may
    come from several processes.
    """
    totals: dict[str, list[float]] = {}
    for index, nll, count in scored:
        example = examples[index].example
        for key in ("all", f"lang:{example.language}", f"cat:{example.category}"):
            bucket = totals.setdefault(key, [0.0, 0])
            bucket[0] += nll
            bucket[1] += count

    def ppl(bucket: list[float]) -> float:
        return math.exp(bucket[0] / bucket[1]) if bucket[1] else float("nan")

    nll, tokens = totals.get("all", [0.0, 0])
    return Perplexity(
        overall=ppl([nll, tokens]),
        loss=nll / tokens if tokens else float("nan"),
        tokens=int(tokens),
        by_language={k[5:]: ppl(v) for k, v in sorted(totals.items()) if k.startswith("lang:")},
        by_category={k[4:]: ppl(v) for k, v in sorted(totals.items()) if k.startswith("cat:")},
    )


def _gather(items: list[Scored]) -> list[Scored]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    gathered: list[list[Scored] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in (part or [])]


def _accepts_logits_mask(model: Any) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def answer_nll(model: Any, encoded: EncodedExample, mask_logits: bool = True) -> tuple[float, int]:
    """Summed NLL of the answer tokens of one example, and how many there are."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([encoded.input_ids], device=device)
    labels = torch.tensor(encoded.labels[1:], device=device)
    targets = labels != IGNORE_INDEX
    if not bool(targets.any()):
        return 0.0, 0
    kwargs: dict[str, Any] = {}
    if mask_logits:
        keep = torch.zeros_like(ids, dtype=torch.bool)
        keep[0, :-1] = targets
        kwargs["logits_to_keep"] = keep
    with torch.inference_mode():
        logits = model(input_ids=ids, **kwargs).logits
    logits = logits[0, :-1][targets] if logits.dim() == 3 else logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, labels[targets].unsqueeze(-1)).sum()
    return float(nll), int(targets.sum())


def evaluate_split(model: Any, examples: Sequence[EncodedExample], rank: int = 0,
                   world_size: int = 1) -> Perplexity:
    """Answer-token loss and perplexity of `model` on `examples` (all ranks must call it)."""
    was_training = model.training
    model.eval()
    try:
        mask_logits = _accepts_logits_mask(model)
        mine = list(range(rank, len(examples), world_size))
        rounds = math.ceil(len(examples) / world_size) if examples else 0
        scored: list[Scored] = []
        for step in range(rounds):
            if step < len(mine):
                nll, count = answer_nll(model, examples[mine[step]], mask_logits)
                scored.append((mine[step], nll, count))
            else:  # keep forward passes in step across ranks; the result is discarded
                answer_nll(model, examples[0], mask_logits)
    finally:
        model.train(was_training)
    return pool(examples, _gather(scored))
