"""Prompt-lookup speculation: one client, the same engine drafting and not, in one process.

    .venv/bin/python benchmarks/speculation.py --save   # onnx-w8a8, onnx-int4, onnx-int8 of runs/demo

For each export, two engines as `toolkit serve` builds them (`--speculative-tokens 0` and
`--speculative-tokens N`) run in this process, one request at a time (the case drafts are for),
on serve_throughput's requests (the run's system prompt, a question, 64 greedy tokens with
ignore_eos), in passes A B B A per round. It prints tokens/s of each and their ratio, the
share of draft tokens kept, steps per 100 tokens, and how many answers were the same text on
both sides (fp32 graphs: all; quantized graphs round a several-token run differently from
one-token steps, so answers can part at near-ties). `--save` writes
benchmarks/results/speculation.json and re-renders the README block.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import build_engine  # the benchmarks folder is not a package
from serve_throughput import PROMPTS, REPO, SYSTEM_PROMPT, chat_messages, run_client

#: engine counters read before and after each pass
COUNTERS = ("steps", "rows_decoded", "draft_tokens", "accepted_tokens")


async def answer(engine: Any, prepared: Any) -> tuple[str, int, float]:
    """One request through the engine: its text, tokens and seconds."""
    started = time.perf_counter()
    text, tokens = [], 0
    async for chunk in engine.generate(prepared):
        text.append(chunk.text)
        tokens += chunk.tokens
    return "".join(text), tokens, time.perf_counter() - started


def requests(engine: Any, count: int, max_tokens: int) -> list[Any]:
    """`count` prepared chat requests, numbered like serve_throughput's (none repeats)."""
    from toolkit.serve.engines import GenerationRequest, SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [engine.prepare(GenerationRequest(
        sampling, messages=chat_messages(SYSTEM_PROMPT, PROMPTS[i % len(PROMPTS)], i)))
        for i in range(count)]


async def run_export(export: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Both engines on one export, passes interleaved; one result row."""
    engines = {"off": build_engine(export, args.threads, 1, speculative_tokens=0),
               "on": build_engine(export, args.threads, 1,
                                  speculative_tokens=args.speculative_tokens)}
    try:
        for engine in engines.values():
            await engine.start()
        work = {side: requests(engine, args.requests, args.max_tokens)
                for side, engine in engines.items()}
        for side, engine in engines.items():  # warm-up
            await answer(engine, work[side][0])
        wall = dict.fromkeys(engines, 0.0)
        tokens = dict.fromkeys(engines, 0)
        texts: dict[str, list[str]] = {side: [] for side in engines}
        counts = {side: dict.fromkeys(COUNTERS, 0) for side in engines}
        for _ in range(args.rounds):
            for side in ("off", "on", "on", "off"):
                before = engines[side].status()
                for prepared in work[side]:
                    text, produced, seconds = await answer(engines[side], prepared)
                    texts[side].append(text)
                    tokens[side] += produced
                    wall[side] += seconds
                after = engines[side].status()
                for key in COUNTERS:
                    counts[side][key] += after[key] - before[key]
        rate = {side: tokens[side] / wall[side] for side in engines}
        on = counts["on"]
        return {
            "export": export.name, "requests": len(texts["on"]),
            "off_tokens_per_s": round(rate["off"], 1), "on_tokens_per_s": round(rate["on"], 1),
            "speedup": round(rate["on"] / rate["off"], 3),
            "drafts_kept": f"{on['accepted_tokens']}/{on['draft_tokens']}",
            "steps_per_100_tokens": {side: round(100 * counts[side]["steps"]
                                                 / max(counts[side]["rows_decoded"]
                                                       + counts[side]["accepted_tokens"], 1))
                                     for side in engines},
            "identical_answers": f"{sum(a == b for a, b in zip(texts['on'], texts['off']))}"
                                 f"/{len(texts['on'])}",
        }
    finally:
        for engine in engines.values():
            await engine.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, nargs="+", default=[
        REPO / "runs" / "demo" / "exports" / name
        for name in ("onnx-w8a8", "onnx-int4", "onnx-int8")])
    parser.add_argument("--requests", type=int, default=6, help="requests per pass")
    parser.add_argument("--rounds", type=int, default=2, help="A B B A rounds")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--speculative-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="engine threads")
    parser.add_argument("--save", action="store_true",
                        help="write benchmarks/results/speculation.json and the README block")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from results import render_speculation, save

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.threads} "
          f"threads; one request at a time; {args.max_tokens} greedy tokens (ignore_eos)",
          flush=True)
    rows = []
    for export in args.export:
        row = run_client(run_export(export, args))
        print(f"  {row['export']:<10} {row['off_tokens_per_s']:6.1f} -> "
              f"{row['on_tokens_per_s']:6.1f} tok/s ({row['speedup']:.2f}x)  drafts kept "
              f"{row['drafts_kept']}  identical answers {row['identical_answers']}", flush=True)
        rows.append(row)
    settings = {"exports": [str(p) for p in args.export], "threads": args.threads,
                "max_tokens": args.max_tokens, "requests": args.requests, "rounds": args.rounds,
                "speculative_tokens": args.speculative_tokens}
    print()
    print(render_speculation({"settings": settings, "rows": rows}))
    if args.save:
        save("speculation", settings, rows)


if __name__ == "__main__":
    main()
