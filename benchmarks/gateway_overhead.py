"""The gateway's own cost: one embedded engine called in-process vs the same engine behind HTTP.

    .venv/bin/python benchmarks/gateway_overhead.py --save   # onnx-int8 and onnx-w8a8 of runs/demo

"direct" submits already-tokenized requests to the engine's `generate` (the BatchScheduler)
in this process; "gateway" runs `toolkit serve EXPORT` (same engine, same threads) and sends
the same requests as streamed chat completions over HTTP, so the difference is what the
gateway adds: body parsing and validation, chat templating and tokenization, admission,
SSE encoding, metrics and the completion record, plus the HTTP client here. Both sides
produce exactly `--max-tokens` greedy tokens per answer (ignore_eos); passes interleave
A B B A at every client count. Overhead = 1 - gateway tok/s / direct tok/s; target < 5 %.
Each row also carries the engine's batching counters on both sides (rows per decode step,
prefill calls and their time, decode step time; the gateway's from its `/ready`), which tell
a slower engine step (CPU taken by the server's event loop) from a different batching (HTTP
arrivals a few ms apart split one prefill into two).
`--save` writes benchmarks/results/gateway_overhead.json and re-renders the README block.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import (  # the benchmarks folder is not a package
    PROMPTS,
    REPO,
    Sample,
    free_port,
    one_request,
    run_client,
    start,
    stop,
    wait_ready,
)


async def direct_request(engine: Any, prepared: Any) -> Sample:
    """One already-tokenized request through the engine's generate API."""
    started = time.perf_counter()
    ttft, tokens = None, 0
    async for chunk in engine.generate(prepared):
        tokens += chunk.tokens
        if ttft is None and chunk.text:
            ttft = time.perf_counter() - started
    return Sample(ttft, time.perf_counter() - started, tokens)


#: the engine's batching counters (`/ready` on the gateway side), compared per pass
BATCH_COUNTERS = ("steps", "prefills", "rows_decoded", "prefill_s", "decode_s")


def batching_summary(counts: dict[str, float], wall_s: float) -> dict[str, float]:
    """One side's counters over its passes: rows per step, prefills, step time, engine busy."""
    steps = max(counts["steps"], 1)
    return {"rows_per_step": round(counts["rows_decoded"] / steps, 1),
            "prefills": counts["prefills"], "prefill_s": round(counts["prefill_s"], 2),
            "step_ms": round(1000 * counts["decode_s"] / steps, 1),
            "busy_pct": round(100 * (counts["prefill_s"] + counts["decode_s"]) / wall_s)}


async def _direct_counters(engine: Any) -> dict[str, int]:
    """The in-process engine's batching counters."""
    return engine.status()


async def _gateway_counters(client: httpx.AsyncClient, url: str) -> dict[str, int]:
    """The served engine's batching counters, from its `/ready` answer."""
    return (await client.get(f"{url}/ready")).json()


async def run_pass(send: Any, clients: int, per_client: int) -> tuple[float, list[Sample]]:
    """`clients` concurrent clients, each sending `per_client` requests back to back."""
    async def worker(index: int) -> list[Sample]:
        return [await send(PROMPTS[(index + k) % len(PROMPTS)]) for k in range(per_client)]

    started = time.perf_counter()
    done = await asyncio.gather(*(worker(i) for i in range(clients)))
    return time.perf_counter() - started, [s for samples in done for s in samples]


def build_engine(export: Path, threads: int, max_concurrency: int, **options: Any) -> Any:
    """The engine `toolkit serve EXPORT` (with `options`, ServeSettings fields) would build,
    for this process."""
    from toolkit.serve import ServeSettings
    from toolkit.serve.engines import build_engine as build
    from toolkit.serve.select import choose_engine, resolve_served_model

    settings = ServeSettings(model=str(export), threads=threads, max_concurrency=max_concurrency,
                             **options)
    served = resolve_served_model(settings.model, "bench")
    choice, _ = choose_engine(settings, served)
    return build(settings, served, choice)


async def measure(engine: Any, url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from toolkit.serve.engines import GenerationRequest, SamplingParams

    prepared = {}
    for prompt in PROMPTS:  # tokenized once, outside the timed region: that is the gateway's job
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        prepared[prompt] = engine.prepare(GenerationRequest(
            sampling, messages=[{"role": "user", "content": prompt}]))
    async with httpx.AsyncClient(timeout=60) as client:  # for /ready's counters only
        sides = {
            "direct": lambda prompt: direct_request(engine, prepared[prompt]),
            "gateway": lambda prompt: one_request(url, [{"role": "user", "content": prompt}],
                                                  args.max_tokens),
        }
        counters = {
            "direct": lambda: _direct_counters(engine),
            "gateway": lambda: _gateway_counters(client, url),
        }
        for send in sides.values():  # warm-up
            await run_pass(send, 2, 1)
        rows = []
        for clients in args.clients:
            walls = dict.fromkeys(sides, 0.0)
            samples: dict[str, list[Sample]] = {side: [] for side in sides}
            batching = {side: dict.fromkeys(BATCH_COUNTERS, 0) for side in sides}
            for side in ("direct", "gateway", "gateway", "direct"):
                before = await counters[side]()
                wall, got = await run_pass(sides[side], clients, args.rounds)
                after = await counters[side]()
                walls[side] += wall
                samples[side] += got
                for key in BATCH_COUNTERS:
                    batching[side][key] += after[key] - before[key]
            rate = {side: sum(s.tokens for s in samples[side]) / walls[side] for side in sides}
            lengths = {s.tokens for side in sides for s in samples[side]}
            row = {
                "engine": engine.info.engine, "clients": clients,
                "direct_tokens_per_s": round(rate["direct"], 1),
                "gateway_tokens_per_s": round(rate["gateway"], 1),
                "overhead_pct": round(100 * (1 - rate["gateway"] / rate["direct"]), 1),
                "direct_latency_p50_s": round(statistics.median(
                    s.latency_s for s in samples["direct"]), 3),
                "gateway_latency_p50_s": round(statistics.median(
                    s.latency_s for s in samples["gateway"]), 3),
                "answer_tokens": sorted(lengths),
                **{f"{side}_{key}": value for side in sides
                   for key, value in batching_summary(batching[side], walls[side]).items()},
            }
            print(f"  c={clients:<3} direct {row['direct_tokens_per_s']:7.1f} tok/s  gateway "
                  f"{row['gateway_tokens_per_s']:7.1f} tok/s  overhead {row['overhead_pct']:+.1f} %"
                  f"  tokens/answer {row['answer_tokens']}  rows/step {row['direct_rows_per_step']} vs "
                  f"{row['gateway_rows_per_step']}  prefills {row['direct_prefills']} vs "
                  f"{row['gateway_prefills']} ({row['direct_prefill_s']} vs "
                  f"{row['gateway_prefill_s']} s)  step {row['direct_step_ms']} vs "
                  f"{row['gateway_step_ms']} ms  engine busy {row['direct_busy_pct']} vs "
                  f"{row['gateway_busy_pct']} %", flush=True)
            rows.append(row)
        return rows


async def run_export(export: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Both sides on one export: its in-process engine, then `toolkit serve` in a child."""
    engine = build_engine(export, args.threads, max(args.clients))
    port = free_port()
    args.workdir.mkdir(parents=True, exist_ok=True)
    proc = start([sys.executable, "-m", "toolkit", "serve", str(export), "--port", str(port),
                  "--max-concurrency", str(max(args.clients)), "--model-name", "bench",
                  "--threads", str(args.threads), "--feedback-db",
                  str(args.workdir / "feedback.db")],
                 args.workdir / "gateway.log", env={"PYTHONPATH": str(REPO)})
    try:
        await engine.start()
        url = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(wait_ready, url, proc, 600, "/ready")
        return [{"export": export.name, **row} for row in await measure(engine, url, args)]
    finally:
        stop(proc)
        await engine.stop()


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every export in turn (one engine in memory at a time)."""
    rows = []
    for export in args.export:
        print(f"{export}:", flush=True)
        rows += await run_export(export, args)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, nargs="+", default=[
        REPO / "runs" / "demo" / "exports" / name for name in ("onnx-int8", "onnx-w8a8")])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=4, help="requests per client per pass")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="engine threads, both sides")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-overhead")
    parser.add_argument("--save", action="store_true",
                        help="write benchmarks/results/gateway_overhead.json and the README block")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from results import render_gateway_overhead, save

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"{args.threads} engine threads; clients {args.clients}", flush=True)
    rows = run_client(run(args))
    settings = {"exports": [str(p) for p in args.export], "threads": args.threads, "max_tokens": args.max_tokens,
                "rounds": args.rounds, "clients": args.clients}
    print()
    print(render_gateway_overhead({"settings": settings, "rows": rows}))
    if args.save:
        save("gateway_overhead", settings, rows)


if __name__ == "__main__":
    main()
