"""Measure an export the same way for every format: logits against its reference, held-out
perplexity (overall, fr, en), a reload-and-generate smoke check, greedy speed, and size.

The perplexity code is `toolkit.evaluation`'s (shared with train and compare); this module
only decides what is compared with what, and what counts as passing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.artifacts import EXPORT_REPORT
from toolkit.data.prompts import EncodedExample
from toolkit.evaluation import Perplexity, Speed, measure_speed, perplexity

#: a quantized export whose perplexity more than doubles is not written: it would "work"
#: (load, generate) while answering nonsense
RUINED_DELTA_PCT = 100.0
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx_data", ".onnx.data", ".pt")
REPORT_FILES = (EXPORT_REPORT, "README.md")
VERIFY_PROMPTS = 4
VERIFY_MAX_TOKENS = 128


@dataclass
class Measurement:
    """What `measure` found for one loaded export."""

    perplexity: Perplexity
    speed: Speed
    max_abs_logit_diff: float | None
    generate_ok: bool
    sample: str
    error: str | None = None


def pick_verify_prompts(encoded: list[EncodedExample], count: int = VERIFY_PROMPTS,
                        max_tokens: int = VERIFY_MAX_TOKENS) -> list[list[int]]:
    """Held-out sequences for logit checks, alternating languages (fr, en, fr, en...)."""
    by_lang: dict[str, list[EncodedExample]] = {}
    for item in encoded:
        by_lang.setdefault(item.example.language, []).append(item)
    chosen: list[list[int]] = []
    languages = sorted(by_lang, key=lambda lang: (lang != "fr", lang))
    index = 0
    while len(chosen) < count and any(index < len(v) for v in by_lang.values()):
        for lang in languages:
            if index < len(by_lang[lang]) and len(chosen) < count:
                chosen.append(list(by_lang[lang][index].input_ids[:max_tokens]))
        index += 1
    return chosen


def logits_on(logits_fn: Any, prompts: list[list[int]]) -> list[np.ndarray]:
    """float32 logits of each prompt."""
    return [np.asarray(logits_fn(np.asarray([p], dtype=np.int64)), dtype=np.float32)
            for p in prompts]


def logit_scale(logits: list[np.ndarray]) -> float:
    """max(1, max |logit|): logit tolerances are relative to it."""
    return max([1.0] + [float(np.abs(x).max()) for x in logits])


def max_abs_diff(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """Largest |difference| over every prompt and position."""
    return max((float(np.abs(a - b).max()) for a, b in zip(reference, candidate)), default=0.0)


def measure(loaded: Any, encoded: list[EncodedExample], speed_prompt: list[int],
            prompts: list[list[int]], reference_logits: list[np.ndarray] | None,
            threads: int = 1, speed_tokens: int = 32) -> Measurement:
    """Score, smoke-test and time one loaded export (`loading.LoadedExport`)."""
    from toolkit.evaluation import max_abs_logit_diff

    diff = None
    if reference_logits is not None and prompts:
        stored = {tuple(p): ref for p, ref in zip(prompts, reference_logits)}
        diff = max_abs_logit_diff(lambda ids: stored[tuple(int(i) for i in ids[0])],
                                  loaded.logits_fn, prompts)
    ppl = perplexity(loaded.logits_fn, encoded, progress=True)
    try:
        new = loaded.generate(speed_prompt, 16)
        sample, ok, error = loaded.tokenizer.decode(new, skip_special_tokens=True), bool(new), None
    except Exception as exc:  # noqa: BLE001 (any backend failure is a failed smoke check)
        sample, ok, error = "", False, f"{type(exc).__name__}: {exc}"
    speed = Speed(0.0, 0, 0.0, threads)
    if ok:
        with _pinned_threads(threads):
            speed = measure_speed(
                lambda ids, n: len(loaded.generate(ids, n, stop_at_eos=False)),
                speed_prompt, new_tokens=speed_tokens, threads=threads)
    return Measurement(ppl, speed, diff, ok, sample, error)


class _pinned_threads:
    """Pin torch's intra-op threads for a timing (2 threads on 2 shared cores can be 3x
    slower than 1), then restore them."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.previous: int | None = None

    def __enter__(self) -> None:
        import torch

        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.previous:
            torch.set_num_threads(self.previous)


def ppl_summary(ppl: Perplexity | dict[str, Any]) -> dict[str, Any]:
    """{overall, fr, en, loss, tokens, by_language, by_category} of a `Perplexity`."""
    data = ppl.to_dict() if isinstance(ppl, Perplexity) else dict(ppl)
    langs = data.get("by_language") or {}
    return {"overall": data.get("overall"), "fr": langs.get("fr"), "en": langs.get("en"),
            "loss": data.get("loss"), "tokens": data.get("tokens"),
            "by_language": langs, "by_category": data.get("by_category") or {}}


def folder_sizes(folder: Path) -> tuple[int, int]:
    """(all files except the report and card, weight files only) in bytes."""
    total = weights = 0
    for item in Path(folder).rglob("*"):
        if not item.is_file() or item.name in REPORT_FILES:
            continue
        size = item.stat().st_size
        total += size
        if item.name.endswith(WEIGHT_SUFFIXES):
            weights += size
    return total, weights


def parameter_count(model_dir: Path) -> int:
    """Parameters stored in a folder's safetensors files (tied weights counted once)."""
    from safetensors import safe_open

    count = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "np") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                count += math.prod(handle.get_slice(key).get_shape())
    return count


def verdict(delta: float | None, target: float | None, is_reference: bool) -> str:
    """"reference", "ok", "degraded" (beyond target, still written) or "ruined" (not written)."""
    if is_reference:
        return "reference"
    if delta is None or math.isnan(delta):
        return "ruined"
    if delta > RUINED_DELTA_PCT:
        return "ruined"
    if target is not None and delta > target:
        return "degraded"
    return "ok"
