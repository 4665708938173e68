"""Huge pages for the weights: one decode step with and without, in one process.

    .venv/bin/python benchmarks/huge_pages.py [--export DIR ...] [--rounds 4] [--save]

For each export (default: runs/demo's onnx-w8a8, onnx-int4 and onnx-int8), in a process of its
own, two sessions of the same graph are opened: first the served one, whose weights
`toolkit.runtime.huge_pages.back_with_huge_pages` moves into 2 MB pages (what the ONNX engine
does at start), then a baseline opened after it, whose mappings were never advised (checked: the
process's huge-page total does not grow). Rounds interleave them (A B B A): each run prefills a
48-token prompt and decodes `--tokens` greedy tokens at one row with the in-place KV backend, 2
threads; a run's figure is its median step. speedup = baseline step / huge-page step (> 1: huge
pages are faster). The baseline is the session made last, which this VM tends to run fastest, so
the figure leans against huge pages.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO = REPO / "runs" / "demo" / "exports"


def median_step_ms(backend: Any, prompt: list[int], tokens: int) -> float:
    """Median ms of one-row decode steps after prefilling `prompt`."""
    state, logits = backend.prefill([prompt])
    steps = []
    for _ in range(tokens):
        started = time.perf_counter()
        state, logits = backend.decode(state, logits.argmax(-1))
        steps.append(time.perf_counter() - started)
    return statistics.median(steps) * 1e3


def measure(export: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Both sessions of one export, interleaved."""
    from toolkit.runtime.huge_pages import anon_huge_mb, back_with_huge_pages
    from toolkit.runtime.onnx_model import OnnxCausalLM
    from toolkit.runtime.onnx_steps import step_backend

    capacity = 48 + args.tokens
    served = OnnxCausalLM.from_dir(export, threads=args.threads)
    pages = back_with_huge_pages()
    huge_mb = pages.huge_mb
    baseline = OnnxCausalLM.from_dir(export, threads=args.threads)
    if anon_huge_mb() > huge_mb + 8:
        raise RuntimeError("the baseline's weights got huge pages too (THP `always`?): "
                           "no baseline to compare with")
    backends = {"huge": step_backend(served, capacity), "base": step_backend(baseline, capacity)}
    prompt = np.random.default_rng(0).integers(100, 20000, 48).tolist()
    found: dict[str, list[float]] = {"huge": [], "base": []}
    for r in range(args.rounds):
        for side in ("huge", "base") if r % 2 == 0 else ("base", "huge"):
            found[side].append(median_step_ms(backends[side], prompt, args.tokens))
    huge_ms, base_ms = statistics.median(found["huge"]), statistics.median(found["base"])
    row = {"export": export.name, "huge_mb": huge_mb, "base_step_ms": round(base_ms, 2),
           "huge_step_ms": round(huge_ms, 2), "speedup": round(base_ms / huge_ms, 3),
           "pages": pages.reason}
    print(f"{export.name:12s} huge pages {huge_mb} MB: step {base_ms:.2f} -> {huge_ms:.2f} ms, "
          f"{row['speedup']:.2f}x  ({row['pages']})", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", type=Path, nargs="+", default=[
        DEMO / name for name in ("onnx-w8a8", "onnx-int4", "onnx-int8")])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--json", action="store_true", help="(internal) print the row as JSON")
    args = parser.parse_args()
    if args.json:
        (export,) = args.export
        print(json.dumps(measure(export, args)))
        return
    # each export in a fresh process, as a server loads it: a second model loaded in the same
    # process lands in memory the first one freed, and its baseline ran slower than its own
    # huge-page session there (0.88x for onnx-int4 after onnx-w8a8; 1.04x alone)
    rows = []
    for export in args.export:
        done = subprocess.run(
            [sys.executable, __file__, "--json", "--export", str(export), "--rounds",
             str(args.rounds), "--tokens", str(args.tokens), "--threads", str(args.threads)],
            check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(done.stdout.strip().splitlines()[-2], flush=True)
    if args.save:
        from benchmarks.results import save

        save("huge_pages", {"rounds": args.rounds, "tokens": args.tokens,
                            "threads": args.threads}, rows)


if __name__ == "__main__":
    main()
