"""Prefill batching: prompts split into runs of similar lengths against one padded run, in one process.

    .venv/bin/python benchmarks/prefill_batching.py [--export DIR ...] [--rounds 4] [--save]

For each export (default: runs/demo's onnx-w8a8 and onnx-int4) one in-place KV backend with a
prefix cache, as the ONNX engine serves, prefills two bursts of 16 chat prompts (the run's
system prompt, cached after the first burst, and a question no other prompt repeats):
`serve_throughput.py`'s questions, and the same with one of them replaced by a long pasted
protocol. Each burst is prefilled with the served grouping (`onnx_shared_kv.padded_runs`:
runs of similar lengths where a run saves more padded positions than it costs) and with the
baseline, one right-padded run for the whole burst (what the engine did before: these bursts
have no one-token rests and fit the arena, the two cases where it split), rounds
interleaved (A B B A), 2 threads; speedup = baseline / served median time (> 1: faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
DEMO = REPO / "runs" / "demo" / "exports"
#: a protocol pasted into a question: ~660 tokens with SmolLM2's tokenizer
SENTENCE = ("Le protocole de prise en charge d'une chute prévoit l'évaluation, la surveillance "
            "et la traçabilité.")
LONG_QUESTION = " ".join([SENTENCE] * 18)


def bursts(tokenizer: Any, offset: int) -> dict[str, list[list[int]]]:
    """The two bursts of 16 prompts, with questions numbered from `offset` (never repeated)."""
    import serve_throughput as st

    def prompt(question: str, number: int) -> list[int]:
        return tokenizer.apply_chat_template(
            st.chat_messages(st.SYSTEM_PROMPT, question, number), add_generation_prompt=True,
            tokenize=True, return_dict=False)

    chat = [prompt(st.PROMPTS[i % len(st.PROMPTS)], offset * 100 + i) for i in range(16)]
    return {"16 chat prompts": chat,
            "15 chat + 1 long": chat[:15] + [prompt(LONG_QUESTION, offset * 100 + 99)]}


def one_run(widths: list[int], cached: list[int] | None = None,
            room: int | None = None) -> list[range]:
    """The baseline grouping: every row in one run."""
    return [range(len(widths))] if widths else []


def measure(export: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Both groupings on one export's backend, interleaved; a row per burst."""
    from toolkit.runtime import onnx_shared_kv
    from toolkit.runtime.loading import load_tokenizer
    from toolkit.runtime.onnx_model import OnnxCausalLM
    from toolkit.runtime.onnx_steps import step_backend

    tokenizer = load_tokenizer(export)
    backend = step_backend(OnnxCausalLM.from_dir(export, threads=args.threads), 4096,
                           prefix_cache_bytes=256 << 20)
    backend.prefill(bursts(tokenizer, 0)["16 chat prompts"][:1])  # caches the system prompt
    groupings = {"served": onnx_shared_kv.padded_runs, "one run": one_run}
    times: dict[tuple[str, str], list[float]] = {}
    offset = 1
    try:
        for r in range(args.rounds):
            for side in ("served", "one run") if r % 2 == 0 else ("one run", "served"):
                onnx_shared_kv.padded_runs = groupings[side]
                for burst, prompts in bursts(tokenizer, offset).items():
                    started = time.perf_counter()
                    backend.prefill(prompts)
                    times.setdefault((burst, side), []).append(time.perf_counter() - started)
                offset += 1
    finally:
        onnx_shared_kv.padded_runs = groupings["served"]
    rows = []
    for burst, prompts in bursts(tokenizer, 0).items():
        served = statistics.median(times[(burst, "served")]) * 1e3
        base = statistics.median(times[(burst, "one run")]) * 1e3
        rows.append({"export": export.name, "burst": burst,
                     "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
                     "one_run_ms": round(base, 1), "served_ms": round(served, 1),
                     "speedup": round(base / served, 3)})
        print(f"{export.name:10s} {burst:18s} one run {base:7.0f} ms  served {served:7.0f} ms  "
              f"{base / served:.2f}x", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", type=Path, nargs="+",
                        default=[DEMO / name for name in ("onnx-w8a8", "onnx-int4")])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    rows = [row for export in args.export for row in measure(export, args)]
    if args.save:
        from benchmarks.results import save

        save("prefill_batching", {"rounds": args.rounds, "threads": args.threads}, rows)


if __name__ == "__main__":
    main()
