"""One decoding step at a time: the backend protocol, the token rule, and the greedy loop.

A `StepBackend` runs prefill and one-token decode steps over a batch (torch: `torch_steps`,
ONNX Runtime: `onnx_steps`). Serve's continuous-batching scheduler drives it with many rows;
export's verification and speed measurement and compare's answers drive the same backends
through `greedy_generate`, so a report's tokens/s and sample are those of the serving code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: top-p sampling sorts this many candidates first and falls back to the full vocabulary
#: only when they hold less than top_p of the mass (sorting 50k logits per row per step is slow)
TOP_P_CANDIDATES = 512


class StepBackend(Protocol):
    """The tensor side of batched decoding; states are opaque to the scheduler.

    A backend may also offer `prefill_into(state, prompts, cache_salts)`: `merge(state,
    prefill(prompts))` in one call, for a caller whose `state` (or None) is the backend's only
    one in use, so the prompts can go straight into its free cache rows (`onnx_shared_kv`).
    """

    #: False when states of different lengths cannot be merged (then requests are batched in
    #: waves: those arriving while a batch runs wait until it ends)
    can_merge: bool

    def prefill(self, prompts: list[list[int]],
                cache_salts: list[str | None] | None = None) -> tuple[Any, np.ndarray]:
        """Run the prompts; return the state and last-position logits (n, vocab).

        `cache_salts` scope a backend's prompt-prefix cache per prompt (a prompt reuses only
        prefixes cached under its salt); a backend without such a cache ignores them.
        """

    def decode(self, state: Any, tokens: np.ndarray) -> tuple[Any, np.ndarray]:
        """Feed one token per row; return the new state and logits (n, vocab)."""

    def select(self, state: Any, rows: list[int]) -> Any:
        """Keep only `rows` of the batch (in that order)."""

    def merge(self, first: Any, second: Any) -> Any:
        """One state holding the rows of `first` then those of `second`."""


@runtime_checkable
class DraftingBackend(StepBackend, Protocol):
    """A `StepBackend` that can check drafts: several tokens per row in one run
    (`runtime.speculation`), and forget the rejected ones."""

    #: whether `extend` takes several rows at once (else one-row states only)
    batch_extend: bool

    def extend(self, state: Any, tokens: np.ndarray, counts: np.ndarray) -> tuple[Any, np.ndarray]:
        """Feed row i its first `counts[i]` tokens of `tokens[i]` (rows, width; right-padded);
        the new state and the logits after each position (rows, width, vocab; a row's padded
        positions hold no meaning)."""

    def rewind(self, state: Any, positions: np.ndarray) -> Any:
        """Forget row i's last `positions[i]` tokens."""


def is_greedy(temperature: float, top_p: float) -> bool:
    """Whether these sampling settings mean the argmax: temperature or top_p 0 (OpenAI allows
    both)."""
    return temperature <= 0 or top_p <= 0


def sample_token(logits: np.ndarray, temperature: float, top_p: float,
                 rng: np.random.Generator) -> int:
    """The argmax when `is_greedy`, else a nucleus sample."""
    if is_greedy(temperature, top_p):
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if top_p < 1.0:
        k = min(TOP_P_CANDIDATES, scaled.shape[-1])
        candidates = np.argpartition(-scaled, k - 1)[:k]
        full = np.exp(scaled - scaled.max())
        total = full.sum()
        order = candidates[np.argsort(-scaled[candidates])]
        probs = full[order] / total
        if probs.sum() < top_p:
            order = np.argsort(-scaled)
            probs = full[order] / total
        cumulative = np.cumsum(probs)
        keep = int(np.searchsorted(cumulative, top_p) + 1)
        kept = probs[:keep] / probs[:keep].sum()
        return int(order[rng.choice(keep, p=kept)])
    probs = np.exp(scaled - scaled.max())
    cumulative = np.cumsum(probs)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"),
                   len(probs) - 1))


def greedy_generate(backend: StepBackend, prompt_ids: list[int], max_new_tokens: int,
                    eos: Iterable[int] = (), stop_at_eos: bool = True) -> list[int]:
    """Batch-1 greedy decoding: the new token ids (an EOS that ends the reply included).

    Args:
        stop_at_eos: False decodes exactly `max_new_tokens` (what speed measurements use).
    """
    if not prompt_ids:
        raise ValueError("generate needs a non-empty prompt")
    stop = frozenset(eos) if stop_at_eos else frozenset()
    out: list[int] = []
    if max_new_tokens <= 0:
        return out
    state, logits = backend.prefill([list(prompt_ids)])
    while True:
        token = sample_token(logits[0], 0.0, 1.0, _NO_RNG)
        out.append(token)
        if token in stop or len(out) >= max_new_tokens:
            return out
        state, logits = backend.decode(state, np.asarray([token], dtype=np.int64))


#: greedy decoding draws nothing
_NO_RNG = np.random.default_rng(0)
