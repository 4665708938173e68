"""Prompt-lookup speculation: draft tokens from the sequence's own text, checked in one step.

A one-row decode step on a CPU is bound by its matrix kernels reading every weight once, so
feeding a few more tokens of the same row in that step costs far less than a step each. The
draft is what followed the most recent earlier occurrence of the sequence's last `n` tokens
(`n` from `max_n` down to `min_n`): answers repeat their prompt (names, doses, the steps of a
protocol) and themselves. This is vLLM's `ngram` speculative method and llama.cpp's lookup
decoding; no draft model is needed.

Verification is greedy decoding's own rule: draft token `j` is kept only while it equals the
argmax after the tokens before it, and the first argmax that differs is the step's last token
(so a step always yields at least one token). The argmax is taken over the several-token
run's logits, which are a prefill's over the same tokens, bit for bit (measured on onnx-w8a8).
An fp32 graph's one-token steps give the same to ~1e-6; a quantized graph's differ from a
prefill in float summation order, which flips some 8-bit roundings, so answers can part from
the one-token steps' at near-ties: the same model, rounded as its prefill (and the export's
perplexity) rounds. `benchmarks/speculation.py` counts the answers that stay identical.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from toolkit.runtime.steps import DraftingBackend


@dataclass(frozen=True)
class NgramSpeculation:
    """How drafts are looked up.

    Attributes:
        tokens: draft tokens per step at most (0 turns speculation off).
        max_n: longest suffix looked up first.
        min_n: shortest suffix a draft may come from (1 drafts after any repeated token:
            more drafts, fewer kept).
    """

    tokens: int = 4
    max_n: int = 4
    min_n: int = 2

    def __post_init__(self) -> None:
        if self.tokens < 0 or not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"speculation needs tokens >= 0 and 1 <= min_n <= max_n, "
                             f"got {self}")

    def propose(self, context: np.ndarray) -> np.ndarray:
        """Up to `tokens` draft tokens continuing `context` (1-D ids), empty when none match.

        One pass over the context finds the earlier places of its last token; only those are
        extended backwards (at most `max_n` compares each), so a step at 8k tokens of context
        costs tens of microseconds, not a window compare per suffix length.
        """
        size = len(context)
        if self.tokens == 0 or size < 2:
            return context[:0]
        ends = np.flatnonzero(context[:size - 1] == context[size - 1])  # earlier occurrences
        matched = np.ones(len(ends), dtype=np.int64)  # suffix tokens matched at each
        alive = np.ones(len(ends), dtype=bool)
        for back in range(1, min(self.max_n, size - 1)):
            before = ends - back
            alive &= before >= 0
            alive[alive] = context[before[alive]] == context[size - 1 - back]
            matched += alive
        best = int(matched.max(initial=0))
        if best < self.min_n:
            return context[:0]
        start = int(ends[np.flatnonzero(matched == best)[-1]]) + 1  # the most recent longest
        return context[start:start + self.tokens]


def accepted(draft: np.ndarray, choices: np.ndarray) -> int:
    """How many draft tokens greedy decoding confirms.

    `choices[j]` is the argmax after the step's input token `j` (the token fed first, then the
    draft), so draft token `j` stands when it equals `choices[j]` and every one before it stood.
    """
    differs = np.flatnonzero(draft != choices[:len(draft)])
    return int(differs[0]) if differs.size else len(draft)


class DraftPolicy:
    """How often one request's drafts are kept: `a`, its estimated keep rate.

    kept / (kept + missed) over its drafts (a missed token ends a draft), decayed per draft so
    it follows the answer, and fed also on plain steps (the token a draft would have started
    with against the token the step chose). `draft_width` weighs it against the cost of a
    run's extra tokens.
    """

    #: prior: a = 0.5, worth this many observations
    PRIOR = 2.0
    DECAY = 0.9

    def __init__(self) -> None:
        self._kept, self._missed = self.PRIOR / 2, self.PRIOR / 2

    @property
    def keep_rate(self) -> float:
        """The estimated probability that a draft token is kept (`a`)."""
        return self._kept / (self._kept + self._missed)

    def record_draft(self, drafted: int, kept: int) -> None:
        """`kept` of `drafted` draft tokens were confirmed (the first miss ends a draft)."""
        self._kept = self.DECAY * self._kept + kept
        self._missed = self.DECAY * self._missed + (1 if kept < drafted else 0)


def draft_width(policies: list[DraftPolicy], available: list[int], extra_cost: float) -> int:
    """Draft tokens per row for the next run of these rows (0: a plain step).

    If row i keeps each draft token with probability `a_i` (once those before it were), a
    draft of `d` tokens yields (1 - a_i^(d+1)) / (1 - a_i) tokens, and a run `d` tokens wider
    than a step costs (1 + r d) steps of the same rows (`r`: `extra_cost`, measured at that
    many rows when the engine starts, `measure_extra_cost`). The width with the most tokens per
    cost wins; a row with fewer tokens `available` drafts those and rides along (one new token
    in the wider run). One row: 0.2 for onnx-w8a8 and 0.38 for onnx-int4 on 2 AVX2 cores; at 8
    rows ~0.7, where drafts stop paying.

    Nothing here reads a clock, so a lone request's draft lengths, and with them which of its
    tokens a quantized graph computes in several-token runs (rounded as a prefill is), follow
    from its tokens alone: the same greedy request gets the same answer from the same server
    when it runs alone. In a batch they follow from every row's tokens.
    """
    rates = [min(policy.keep_rate, 0.999) for policy in policies]
    best, best_value = 0, float(len(rates))
    for d in range(1, max(available, default=0) + 1):
        tokens = sum((1 - a ** (min(d, n) + 1)) / (1 - a) for a, n in zip(rates, available))
        value = tokens / (1 + extra_cost * d)
        if value > best_value:
            best, best_value = d, value
    return best


def measure_extra_cost(backend: DraftingBackend, tokens: int, rows: int = 1,
                       rounds: int = 8) -> float:
    """`r`: what one more token per row in a run of `rows` rows costs, in one-token runs of
    those rows (fastest of `rounds`).

    Timed once when an engine starts, on 16-token dummy prompts (~0.3 s at one row for a 135M
    model on 2 cores): the kernels' cost of more tokens differs 2x between exports and CPUs,
    and grows with the rows (a 16-row step is already a batch of 16 GEMM rows). The fastest
    of several runs each, since other work on the cores (servers starting beside it) only
    ever slows a run: 3 rounds measured onnx-w8a8 at 0.09-0.28 on busy cores.
    """
    state, _ = backend.prefill([list(range(1, 17))] * rows)
    fed = np.tile(np.arange(1, tokens + 2, dtype=np.int64), (rows, 1))
    one = many = float("inf")
    for _ in range(rounds + 1):  # the slowest round (the first: allocations) never counts
        for size in (1, tokens + 1):
            counts = np.full(rows, size, dtype=np.int64)
            started = time.perf_counter()
            state, _ = backend.extend(state, fed[:, :size], counts)
            seconds = time.perf_counter() - started
            state = backend.rewind(state, counts)
            if size == 1:
                one = min(one, seconds)
            else:
                many = min(many, seconds)
    return max(0.0, (many / one - 1) / tokens)
