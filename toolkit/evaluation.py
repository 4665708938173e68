"""Quality and speed measurements shared by train, export and compare.

Perplexity is computed on the reference answers only (the prompt is context, not target),
per example, then pooled overall, per language and per category, so the effect of a
fine-tune or a quantization on French is visible on its own. Any engine plugs in through
a `LogitsFn` (PyTorch model, ONNX Runtime session...), so every format is scored by the
same code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from toolkit.data.prompts import IGNORE_INDEX, EncodedExample

#: token ids (1, T) -> logits (1, T, vocab) as a numpy array
LogitsFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class Perplexity:
    """Perplexity of the reference answers, pooled over tokens."""

    overall: float
    loss: float
    tokens: int
    by_language: dict[str, float] = field(default_factory=dict)
    by_category: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for manifests and reports."""
        return asdict(self)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def example_nll(logits_fn: LogitsFn, encoded: EncodedExample) -> tuple[float, int]:
    """Summed negative log-likelihood of the answer tokens, and how many there are."""
    ids = np.asarray([encoded.input_ids], dtype=np.int64)
    labels = np.asarray(encoded.labels[1:], dtype=np.int64)
    logits = np.asarray(logits_fn(ids), dtype=np.float32)[0, :-1]
    mask = labels != IGNORE_INDEX
    if not mask.any():
        return 0.0, 0
    logp = _log_softmax(logits[mask])
    return float(-logp[np.arange(mask.sum()), labels[mask]].sum()), int(mask.sum())


def _ppl(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens) if tokens else float("nan")


def perplexity(
    logits_fn: LogitsFn, encoded: Iterable[EncodedExample], progress: bool = False
) -> Perplexity:
    """Score every example and pool the answer-token NLL overall and per group."""
    totals: dict[str, list[float]] = {}
    items = list(encoded)
    iterator: Iterable[EncodedExample] = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc="perplexity", unit="ex", leave=False)
    for item in iterator:
        nll, count = example_nll(logits_fn, item)
        for key in ("all", f"lang:{item.example.language}", f"cat:{item.example.category}"):
            bucket = totals.setdefault(key, [0.0, 0])
            bucket[0] += nll
            bucket[1] += count
    nll, tokens = totals.get("all", [0.0, 0])
    return Perplexity(
        overall=_ppl(nll, int(tokens)),
        loss=nll / tokens if tokens else float("nan"),
        tokens=int(tokens),
        by_language={k[5:]: _ppl(v[0], int(v[1])) for k, v in sorted(totals.items())
                     if k.startswith("lang:")},
        by_category={k[4:]: _ppl(v[0], int(v[1])) for k, v in sorted(totals.items())
                     if k.startswith("cat:")},
    )


def torch_logits_fn(model: Any) -> LogitsFn:
    """Wrap a transformers causal LM (any dtype, quantized or not) as a `LogitsFn`."""
    import torch

    device = next(model.parameters()).device

    def logits_fn(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(input_ids=torch.from_numpy(ids).to(device))
        return out.logits.float().cpu().numpy()

    return logits_fn


@dataclass
class Speed:
    """Greedy batch-1 decoding speed on this machine."""

    tokens_per_s: float
    new_tokens: int
    seconds: float
    threads: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for reports."""
        return asdict(self)


def measure_speed(generate: Callable[[list[int], int], int], prompt_ids: list[int],
                  new_tokens: int = 32, threads: int = 1, repeats: int = 3) -> Speed:
    """Time `generate(prompt_ids, max_new_tokens) -> tokens produced` after one warm-up: the
    median of `repeats` runs, since one sub-second run on a shared VM was seen 2x off.

    The caller pins the thread count (and reports it): on 2 shared cores, 2 threads can
    run slower than 1, so an unpinned figure is not comparable across runs.
    """
    generate(prompt_ids, 2)
    runs = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        produced = generate(prompt_ids, new_tokens)
        runs.append((time.perf_counter() - start, produced))
    seconds, produced = sorted(runs)[len(runs) // 2]
    return Speed(produced / seconds if seconds > 0 else 0.0, produced, seconds, threads)


def max_abs_logit_diff(reference: LogitsFn, candidate: LogitsFn,
                       prompts: list[list[int]]) -> float:
    """Largest absolute logit difference between two engines on the same prompts.

    Backs both `--verify`-style checks in export (merged vs adapter, ONNX vs PyTorch) and
    the tests, so what a user sees in a report is what the tests assert.
    """
    worst = 0.0
    for ids in prompts:
        batch = np.asarray([ids], dtype=np.int64)
        diff = np.abs(np.asarray(reference(batch), np.float32) - np.asarray(candidate(batch), np.float32))
        worst = max(worst, float(diff.max()))
    return worst
