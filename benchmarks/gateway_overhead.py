"""The gateway's own cost: one embedded engine called in-process vs the same engine behind HTTP.

    .venv/bin/python benchmarks/gateway_overhead.py --save   # onnx-int8 and onnx-w8a8 of runs/demo

"direct" submits already-tokenized requests to the engine's `generate` (the BatchScheduler)
in this process; "gateway" runs `toolkit serve EXPORT` (same engine, same threads) and sends
the same requests as streamed chat completions over HTTP, so the difference is what the
gateway adds: body parsing and validation, chat templating and tokenization, admission,
SSE encoding, metrics and the completion record, plus the HTTP client here. The requests
are serve_throughput's: its system prompt, then a numbered question that never repeats, so
prefills cost what real traffic's do. Both sides produce exactly `--max-tokens` greedy
tokens per answer (ignore_eos); passes interleave A B B A, `--blocks` times at every client
count, the two sides' mirrored passes asking the same questions. Overhead = 1 - gateway
tok/s / direct tok/s over all passes; target < 5 %. Each block's own overhead is kept too: their spread is the
machine's drift, against which a few percent cannot be told apart.
Each row also carries the engine's batching counters on both sides (rows per decode step,
prefill calls and their time, decode step time; the gateway's from its `/ready`), which tell
a slower engine step (CPU taken by the server's event loop) from a different batching (HTTP
arrivals a few ms apart split one prefill into two), and CPU time per request from /proc:
the direct process, the server process, the server's event-loop thread alone (the gateway's
own work, a share of the direct side's CPU that drift does not move) and the HTTP client.
`--save` writes benchmarks/results/gateway_overhead.json and re-renders the README block.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import (  # the benchmarks folder is not a package
    REPO,
    SYSTEM_PROMPT,
    WARM_UP_OFFSET,
    Sample,
    free_port,
    one_request,
    pass_messages,
    run_client,
    run_requests,
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


def _cpu_s(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of process `pid` (all its threads), or of its thread `tid`."""
    stat = Path(f"/proc/{pid}" + (f"/task/{tid}" if tid else "") + "/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_meters(server_pid: int) -> dict[str, Any]:
    """Per side, the CPU clocks read around each pass (Linux /proc).

    direct: this process (the engine and its in-process consumer). gateway: the server
    process, its event-loop thread (the main thread: HTTP, validation, SSE, metrics) and this
    process (the HTTP client; the direct engine idles meanwhile).
    """
    return {
        "direct": lambda: {"cpu": time.process_time()},
        "gateway": lambda: {"cpu": _cpu_s(server_pid), "loop": _cpu_s(server_pid, server_pid),
                            "client": time.process_time()},
    }


def cpu_summary(cpu: dict[str, dict[str, float]], requests: int) -> dict[str, float]:
    """CPU milliseconds per request by side, and the event loop's share of the engine's CPU
    (the gateway's own work, which the tok/s overhead mixes with contention for the cores)."""
    per = {f"{side}_{clock}": 1000 * seconds / requests
           for side, clocks in cpu.items() for clock, seconds in clocks.items()}
    return {"direct_cpu_ms_per_request": round(per["direct_cpu"], 1),
            "gateway_cpu_ms_per_request": round(per["gateway_cpu"], 1),
            "gateway_loop_ms_per_request": round(per["gateway_loop"], 1),
            "client_cpu_ms_per_request": round(per["gateway_client"], 1),
            "loop_cpu_pct": round(100 * per["gateway_loop"] / per["direct_cpu"], 1)}


def overhead_pct(direct_rate: float, gateway_rate: float) -> float:
    """1 - gateway / direct tok/s, in percent."""
    return round(100 * (1 - gateway_rate / direct_rate), 1)


async def measure(engine: Any, url: str, server_pid: int,
                  args: argparse.Namespace) -> list[dict[str, Any]]:
    from toolkit.serve.engines import GenerationRequest, SamplingParams

    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    def requests(side: str, clients: int, per_client: int, offset: int) -> list[list[Any]]:
        """The pass's messages; for the direct side tokenized here, outside the timed region
        (that is the gateway's job)."""
        messages = pass_messages(SYSTEM_PROMPT, clients, per_client, offset)
        if side == "gateway":
            return messages
        return [[engine.prepare(GenerationRequest(sampling, messages=m)) for m in mine]
                for mine in messages]

    async with httpx.AsyncClient(timeout=60) as client:  # for /ready's counters only
        sides = {
            "direct": lambda prepared: direct_request(engine, prepared),
            "gateway": lambda messages: one_request(url, messages, args.max_tokens),
        }
        counters = {
            "direct": lambda: _direct_counters(engine),
            "gateway": lambda: _gateway_counters(client, url),
        }
        meters = cpu_meters(server_pid)
        for side, send in sides.items():  # warm-up
            await run_requests(send, requests(side, 2, 1, WARM_UP_OFFSET))
        offset = 0
        rows = []
        for clients in args.clients:
            walls = {side: [0.0] * args.blocks for side in sides}
            samples: dict[str, list[list[Sample]]] = {
                side: [[] for _ in range(args.blocks)] for side in sides}
            batching = {side: dict.fromkeys(BATCH_COUNTERS, 0) for side in sides}
            cpu: dict[str, dict[str, float]] = {side: defaultdict(float) for side in sides}
            for block in range(args.blocks):
                # the two sides' passes in mirrored positions ask the same questions
                for side, pair in (("direct", 1), ("gateway", 1), ("gateway", 2), ("direct", 2)):
                    work = requests(side, clients, args.rounds, offset + pair)
                    before, clocks = await counters[side](), meters[side]()
                    wall, got = await run_requests(sides[side], work)
                    for clock, value in meters[side]().items():
                        cpu[side][clock] += value - clocks[clock]
                    after = await counters[side]()
                    walls[side][block] += wall
                    samples[side][block] += got
                    for key in BATCH_COUNTERS:
                        batching[side][key] += after[key] - before[key]
                offset += 2
            every = {side: [s for block in samples[side] for s in block] for side in sides}
            rate = {side: sum(s.tokens for s in every[side]) / sum(walls[side]) for side in sides}
            by_block = [overhead_pct(*(sum(s.tokens for s in samples[side][block])
                                       / walls[side][block] for side in sides))
                        for block in range(args.blocks)]
            lengths = {s.tokens for side in sides for s in every[side]}
            row = {
                "engine": engine.info.engine, "clients": clients,
                "direct_tokens_per_s": round(rate["direct"], 1),
                "gateway_tokens_per_s": round(rate["gateway"], 1),
                "overhead_pct": overhead_pct(rate["direct"], rate["gateway"]),
                "overhead_by_block_pct": by_block,
                "direct_latency_p50_s": round(statistics.median(
                    s.latency_s for s in every["direct"]), 3),
                "gateway_latency_p50_s": round(statistics.median(
                    s.latency_s for s in every["gateway"]), 3),
                "answer_tokens": sorted(lengths),
                **{f"{side}_{key}": value for side in sides
                   for key, value in batching_summary(batching[side], sum(walls[side])).items()},
                **cpu_summary(cpu, len(every["gateway"])),
            }
            print(f"  c={clients:<3} direct {row['direct_tokens_per_s']:7.1f} tok/s  gateway "
                  f"{row['gateway_tokens_per_s']:7.1f} tok/s  overhead {row['overhead_pct']:+.1f} %"
                  f" (blocks {by_block})  tokens/answer {row['answer_tokens']}  rows/step "
                  f"{row['direct_rows_per_step']} vs {row['gateway_rows_per_step']}  prefills "
                  f"{row['direct_prefills']} vs {row['gateway_prefills']} "
                  f"({row['direct_prefill_s']} vs {row['gateway_prefill_s']} s)  step "
                  f"{row['direct_step_ms']} vs {row['gateway_step_ms']} ms  CPU ms/request: "
                  f"direct {row['direct_cpu_ms_per_request']}, server "
                  f"{row['gateway_cpu_ms_per_request']} (event loop "
                  f"{row['gateway_loop_ms_per_request']}, {row['loop_cpu_pct']} % of direct), "
                  f"client {row['client_cpu_ms_per_request']}", flush=True)
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
        return [{"export": export.name, **row}
                for row in await measure(engine, url, proc.pid, args)]
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
    parser.add_argument("--blocks", type=int, default=3,
                        help="A B B A blocks per client count (the overhead's spread across them "
                        "shows the machine's drift)")
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
                "rounds": args.rounds, "blocks": args.blocks, "clients": args.clients}
    print()
    print(render_gateway_overhead({"settings": settings, "rows": rows}))
    if args.save:
        save("gateway_overhead", settings, rows)


if __name__ == "__main__":
    main()
