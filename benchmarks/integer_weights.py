"""What giving integer GEMMs the weight sign this CPU multiplies fastest buys a served export.

An export with integer GEMMs (`onnx-w8a8`: MatMulIntegerToFloat over uint8 weights) opened two
ways in one process, rounds interleaved (A B B A):
- `stored`: the graph as the export stores it;
- `retyped`: as the engine opens it (`toolkit.runtime.integer_weights`): int8 weights where
  this CPU's uint8 x int8 kernel is exact (VNNI, AMX), uint8 where it is not.
Per variant: the median decode step (whole step and the ONNX Runtime call) at each batch size,
greedy, and one prefill of that many chat prompts. Both variants must pick the same tokens
(the products are exact either way); a difference fails the run.

    .venv/bin/python benchmarks/integer_weights.py [--export runs/demo/exports/onnx-w8a8]
        [--threads 2] [--batches 1 16] [--tokens 32] [--rounds 2] [--save]

On a CPU where the stored sign is already the right one both variants are the same graph and
the ratios say how far two identical sessions part here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from onnx_decode import TimedSession, prompts, step_breakdown

VARIANTS = ("stored", "retyped")


@contextmanager
def stored_weights() -> Iterator[None]:
    """Open graphs as stored: the engine's retyping turned off for the duration."""
    from toolkit.runtime import onnx_model

    retype = onnx_model.graph_for_this_cpu
    onnx_model.graph_for_this_cpu = lambda graph: None
    try:
        yield
    finally:
        onnx_model.graph_for_this_cpu = retype


def open_backend(folder: Path, variant: str, threads: int) -> tuple[Any, TimedSession]:
    """The export's step backend, its session wrapped to time the ORT calls."""
    from toolkit.runtime.onnx_model import OnnxCausalLM
    from toolkit.runtime.onnx_steps import step_backend

    if variant == "stored":
        with stored_weights():
            lm = OnnxCausalLM.from_dir(folder, threads=threads)
    else:
        lm = OnnxCausalLM.from_dir(folder, threads=threads)
    timed = TimedSession(lm.session)
    lm.session = timed
    return step_backend(lm, capacity=2048), timed


def measure(folder: Path, threads: int, batches: list[int], tokens: int,
            rounds: int) -> list[dict[str, Any]]:
    """Both variants at every batch size, A B B A; the medians over rounds."""
    from toolkit.runtime.loading import load_tokenizer

    tokenizer = load_tokenizer(folder)
    found: dict[tuple[str, int], dict[str, list[float]]] = {}
    picked: dict[tuple[str, int], np.ndarray] = {}
    for r in range(rounds * 2):
        order = VARIANTS if r % 4 in (0, 3) else tuple(reversed(VARIANTS))
        for variant in order:
            backend, timed = open_backend(folder, variant, threads)
            for rows in batches:
                print(f"integer_weights: round {r + 1}, {variant}, {rows} rows", file=sys.stderr,
                      flush=True)
                step = step_breakdown(backend, timed, prompts(tokenizer, rows), tokens)
                cell = found.setdefault((variant, rows), {"prefill": [], "step": [], "ort": []})
                for key in cell:
                    cell[key].append(step[f"{key}_ms"])
                picked[(variant, rows)] = step["generated"]
    out = []
    for rows in batches:
        if not np.array_equal(picked[("stored", rows)], picked[("retyped", rows)]):
            raise SystemExit(f"integer_weights: {rows} rows: the variants picked different tokens")
        median = {variant: {key: statistics.median(values)
                            for key, values in found[(variant, rows)].items()}
                  for variant in VARIANTS}
        stored, retyped = median["stored"], median["retyped"]
        out.append({"rows": rows,
                    **{f"{variant}_{key}_ms": round(value, 3)
                       for variant in VARIANTS for key, value in median[variant].items()},
                    "step_speedup": round(stored["step"] / retyped["step"], 3),
                    "prefill_speedup": round(stored["prefill"] / retyped["prefill"], 3)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", type=Path, default=REPO_ROOT / "runs/demo/exports/onnx-w8a8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="A B B A rounds")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    from benchmarks.results import render_integer_weights, save
    from toolkit.runtime.integer_weights import signed_weights_exact

    rows = measure(args.export, args.threads, args.batches, args.tokens, args.rounds)
    sign = "int8" if signed_weights_exact() else "uint8"
    settings = {"export": str(args.export), "threads": args.threads, "tokens": args.tokens,
                "rounds": args.rounds, "retyped_sign": sign}
    print(render_integer_weights({"settings": settings, "rows": rows}))
    if args.save:
        save("integer_weights", settings, rows)


if __name__ == "__main__":
    main()
