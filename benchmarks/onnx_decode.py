"""Where a decode step of the embedded ONNX engine goes, old graph and path against new.

Two exports of the same model, in one process, rounds interleaved (A B B A):
- `old`: optimum's graph (`--old`, the `onnx-int8` export) through `OrtStepBackend`: every
  step feeds all past_key_values in and gets a new `present` (past + 1) out, left padding,
  position ids, a `np.concatenate` of the mask, fancy-index copies to drop rows;
- `new`: onnxruntime-genai's builder graph (`--new`, fused GroupQueryAttention/rotary/
  SkipSimplifiedLayerNorm, same MatMulNBits int8 settings) through `SharedKvStepBackend`:
  KV buffers bound once with IO binding and updated in place, rows of any length together.

For each batch size it reports, per decode step: the whole step, the ONNX Runtime call inside
it, and the Python around that call; then the scheduler's own per-token work on the same
tokens: sampling (one `sample_token` per row vs one vectorized argmax) and detokenization
(decoding every generated token each step vs the incremental window of `TextStream`). The last
columns serve the requests through `BatchScheduler` (the engine the gateway calls, without
HTTP), every answer forced to `--tokens` tokens, and give tokens/s.

    .venv/bin/python benchmarks/onnx_decode.py --old runs/demo/exports/onnx-int8 \\
        --new runs/demo/exports/onnx-int8-gqa [--threads 2] [--tokens 64] [--rounds 2] [--save]

Pin threads (`--threads`, also OMP_NUM_THREADS) and say whether the cores were shared: the
ratios are what carry over, the absolute figures depend on the load (saved with the result).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

QUESTIONS = REPO_ROOT / "data" / "test.jsonl"


class TimedSession:
    """Delegates to an ORT session and adds up the seconds spent inside its run calls."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.seconds = 0.0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._session.run(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def run_with_iobinding(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._session.run_with_iobinding(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """Chat-templated questions from the project's test data (lengths differ, as in serving)."""
    questions = [json.loads(line)["instruction"] if "instruction" in json.loads(line)
                 else next(iter(json.loads(line).values()))
                 for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for i in range(count):
        text = tokenizer.apply_chat_template([{"role": "user", "content": questions[i % len(questions)]}],
                                             tokenize=False, add_generation_prompt=True)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def step_breakdown(backend: Any, timed: TimedSession, batch: list[list[int]],
                   tokens: int) -> dict[str, Any]:
    """Prefill `batch`, then greedy decode `tokens` steps; time the prefill, each step and the
    ORT call inside each step."""
    start = time.perf_counter()
    state, logits = backend.prefill(batch)
    prefill = time.perf_counter() - start
    chosen = logits.argmax(axis=-1)
    steps, inside = [], []
    generated = [chosen]
    for _ in range(tokens - 1):
        timed.seconds = 0.0
        start = time.perf_counter()
        state, logits = backend.decode(state, chosen)
        steps.append(time.perf_counter() - start)
        inside.append(timed.seconds)
        chosen = logits.argmax(axis=-1)
        generated.append(chosen)
    step, ort = float(np.median(steps)), float(np.median(inside))
    return {"prefill_ms": prefill * 1e3,
            "step_ms": step * 1e3, "ort_ms": ort * 1e3, "python_ms": (step - ort) * 1e3,
            "tokens_per_s": len(batch) / step, "logits": logits,
            "generated": np.stack(generated, axis=1)}


def scheduler_costs(tokenizer: Any, logits: np.ndarray, generated: np.ndarray) -> dict[str, float]:
    """Per-step cost of what the scheduler does with a step's logits, old way vs new way."""
    from toolkit.runtime.steps import sample_token
    from toolkit.serve.engines.batching import TextStream

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(10):
        [sample_token(row, 0.0, 1.0, rng) for row in logits]
    per_row = (time.perf_counter() - start) / 10
    start = time.perf_counter()
    for _ in range(10):
        logits.argmax(axis=-1)
    vectorized = (time.perf_counter() - start) / 10

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    rows = [row.tolist() for row in generated]
    start = time.perf_counter()
    for row in rows:  # the old TextStream: decode all tokens so far, every step
        for n in range(1, len(row) + 1):
            decode(row[:n])
    full = (time.perf_counter() - start) / len(rows[0])
    start = time.perf_counter()
    for row in rows:
        stream = TextStream(decode, [])
        for n in range(1, len(row) + 1):
            stream.push(row[:n], final=n == len(row))
    incremental = (time.perf_counter() - start) / len(rows[0])
    return {"sample_per_row_ms": per_row * 1e3, "sample_vectorized_ms": vectorized * 1e3,
            "detok_full_ms": full * 1e3, "detok_stream_ms": incremental * 1e3}


def serve_rate(backend: Any, tokenizer: Any, batch: list[list[int]], tokens: int) -> float:
    """Tokens/s of `len(batch)` concurrent requests through `BatchScheduler` (no HTTP)."""
    from toolkit.serve.engines.base import (
        GenerationRequest,
        PreparedRequest,
        SamplingParams,
    )
    from toolkit.serve.engines.batching import BatchScheduler

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    # no EOS: every answer is exactly `tokens` long, as with ignore_eos
    scheduler = BatchScheduler(backend, decode, frozenset(), max_batch=len(batch))
    scheduler.start()

    async def one(ids: list[int]) -> int:
        request = GenerationRequest(SamplingParams(max_tokens=tokens, temperature=0.0), prompt="")
        handle = scheduler.submit(PreparedRequest(request, ids, tokens))
        count = 0
        while True:
            chunk = await handle.queue.get()
            if isinstance(chunk, BaseException):
                raise chunk
            count += chunk.tokens
            if chunk.finish_reason is not None:
                return count

    async def all_of() -> int:
        return sum(await asyncio.gather(*(one(ids) for ids in batch)))

    try:
        start = time.perf_counter()
        produced = asyncio.run(all_of())
        return produced / (time.perf_counter() - start)
    finally:
        scheduler.stop()


def open_variant(folder: Path, threads: int) -> tuple[Any, TimedSession, Any]:
    from toolkit.runtime.loading import load_tokenizer
    from toolkit.runtime.onnx_model import OnnxCausalLM
    from toolkit.runtime.onnx_steps import step_backend

    lm = OnnxCausalLM.from_dir(folder, threads=threads)
    timed = TimedSession(lm.session)
    lm.session = timed
    return step_backend(lm, capacity=2048), timed, load_tokenizer(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", type=Path, default=REPO_ROOT / "runs/demo/exports/onnx-int8")
    parser.add_argument("--new", type=Path, default=REPO_ROOT / "runs/demo/exports/onnx-int8-gqa")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="A B B A rounds per batch size")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    variants = {name: open_variant(folder, args.threads)
                for name, folder in (("old", args.old), ("new", args.new))}
    tokenizer = variants["old"][2]
    rows: list[dict[str, Any]] = []
    for size in args.batches:
        batch = prompts(tokenizer, size)
        found: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
        for _ in range(args.rounds):
            for name in ("old", "new", "new", "old"):
                print(f"onnx_decode: batch {size}, {name}", file=sys.stderr, flush=True)
                backend, timed, _ = variants[name]
                found[name].append(step_breakdown(backend, timed, batch, args.tokens))
                found[name][-1]["serve_tokens_per_s"] = serve_rate(backend, tokenizer, batch,
                                                                   args.tokens)
        for name, runs in found.items():
            best = min(runs, key=lambda r: r["step_ms"])
            costs = scheduler_costs(tokenizer, best["logits"], best["generated"])
            rows.append({
                "path": name, "batch": size,
                **{k: round(float(np.median([r[k] for r in runs])), 3)
                   for k in ("step_ms", "ort_ms", "python_ms", "tokens_per_s")},
                "serve_tokens_per_s": round(max(r["serve_tokens_per_s"] for r in runs), 1),
                **{k: round(v, 3) for k, v in costs.items()},
            })
        same = all(np.array_equal(a["generated"], b["generated"])
                   for a, b in zip(found["old"], found["new"]))
        rows[-1]["greedy_equal_to_old"] = rows[-2]["greedy_equal_to_old"] = bool(same)
    header = ("path", "batch", "step_ms", "ort_ms", "python_ms", "tokens_per_s",
              "serve_tokens_per_s", "sample_per_row_ms", "sample_vectorized_ms",
              "detok_full_ms", "detok_stream_ms", "greedy_equal_to_old")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in header) + " |")
    if args.save:
        from benchmarks.results import save

        save("onnx_decode", {"old": str(args.old), "new": str(args.new), "threads": args.threads,
                             "tokens": args.tokens, "rounds": args.rounds,
                             "batches": args.batches}, rows)


if __name__ == "__main__":
    main()
