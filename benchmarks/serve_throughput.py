"""Serving throughput: the toolkit gateway against llama.cpp's llama-server at 1, 8 and 16 clients.

One command, on as quiet a machine as you have (builds llama.cpp once into ~/.cache/toolkit-bench:
~6.5 min on 2 quiet cores; then ~5 min of measurement):

    .venv/bin/python benchmarks/serve_throughput.py --run runs/demo --save

Setups, all started first and then measured in interleaved passes (A B C C B A) per level:
  toolkit <export>     `toolkit serve EXPORT` (the gateway + its embedded engine) on every
                       --toolkit export; default RUN/exports/ onnx-int8, onnx-w8a8 and
                       onnx-int4, those that exist
  llama-server <quant> llama.cpp's C++ server (`-t T -tb T --parallel 16`, continuous batching)
                       on RUN/exports/merged converted to GGUF and quantized to Q8_0, Q4_1 and
                       Q4_K_M (benchmarks/llama_server.py builds and caches all of it)
  vllm gateway/direct  with --vllm-python: the gateway over vLLM, and vLLM on its private port
  ... +ngram           the same server drafting tokens by n-gram lookup (`--speculation`,
                       default both: every server with and without): the toolkit while at
                       most 2 requests run (`--speculative-tokens`), llama-server with its own
                       `--spec-type ngram-simple` (LLAMA_NGRAM)

Every request streams a chat completion, greedy, `max_tokens` 64 with `ignore_eos`, so every
answer has exactly 64 tokens (checked from each answer's usage: greedy llama.cpp stops early
on about half of these prompts otherwise). Requests look like the assistant's: the run's
system prompt, then a user question that no other request repeats (one of six, numbered), so
a prompt cache can reuse the shared start (chat template and system prompt) and nothing else.
`--prompt-cache on` (default) lets both servers do so (the toolkit's prefix cache,
llama-server's `cache_prompt`); `off` makes both prefill every prompt whole.
tokens/s = completion tokens of a level / its wall
time; latency = a request's whole time; TTFT = first text chunk. Every server gets the same
thread count (--threads, default 2). Ratios compare the same bit width: int8 vs Q8_0, 4-bit vs
Q4_1 and Q4_K_M. Targets (issue 15): toolkit >= 1.0x llama-server at every level; 16 clients
>= 3x one client. `--save` writes benchmarks/results/serve_throughput.json and re-renders the
README block; the load average is saved with it (other work on the cores slows everything).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from toolkit.cpu import cpu_flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_server  # the benchmarks folder is not a package

PROMPTS = [
    "Quelle est la conduite à tenir en cas de chute d'un patient ?",
    "How should a nurse document a medication error?",
    "Explique le protocole de lavage des mains.",
    "What are the steps of a shift handover?",
    "Quels sont les signes d'une hypoglycémie ?",
    "List the checks before a blood transfusion.",
]
REPO = Path(__file__).resolve().parents[1]
#: export format -> bit width compared with llama.cpp's quants of the same width
BITS = {"onnx-int8": "int8", "onnx-w8a8": "int8", "onnx-int4": "4-bit", "onnx": "fp32",
        "merged": "fp32"}
#: the toolkit exports served by default, when the run has them
DEFAULT_EXPORTS = ("onnx-int8", "onnx-w8a8", "onnx-int4")
QUANT_BITS = {"Q8_0": "int8", "Q4_1": "4-bit", "Q4_K_M": "4-bit"}
#: setup name suffix of a server that drafts tokens by n-gram lookup
SPECULATING = " +ngram"
#: llama-server's own n-gram drafts: of lookup lengths 2, 3 and 12 (its default) with 4 or 48
#: (default) draft tokens, 2 and 4 were its fastest one-client setting here (114.7 tok/s on
#: Q8_0 against 104.0 without drafts, 111.2 with its defaults)
LLAMA_NGRAM = ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "2",
               "--spec-ngram-simple-size-m", "4"]


@dataclass
class Setup:
    """One server under test."""

    name: str
    family: str
    bits: str
    url: str
    proc: subprocess.Popen | None = None


@dataclass
class Sample:
    ttft_s: float | None
    latency_s: float
    tokens: int


@dataclass
class Tally:
    """What one setup did at one level, summed over its passes."""

    wall_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    drafted: int = 0  # a toolkit gateway's draft tokens checked and kept (its /ready counters)
    kept: int = 0

    def row(self, setup: Setup, clients: int) -> dict[str, Any]:
        tokens = [s.tokens for s in self.samples]
        ttfts = [s.ttft_s for s in self.samples if s.ttft_s is not None]
        return {
            "setup": setup.name, "family": setup.family, "bits": setup.bits, "clients": clients,
            "requests": len(self.samples),
            "tokens_per_s": round(sum(tokens) / self.wall_s, 1),
            "latency_p50_s": round(statistics.median(s.latency_s for s in self.samples), 3),
            "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1) if ttfts else None,
            "answer_tokens": [min(tokens), max(tokens)],
            "drafts_kept": f"{self.kept}/{self.drafted}" if self.drafted else None,
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: a streamed chunk carrying answer text (the first content character is not the closing quote)
TEXT_DELTA = re.compile(rb'"delta": *\{[^}]*"content": *"[^"]')
#: bytes of the stream's end kept for its usage chunk
TAIL_BYTES = 8192


#: the system prompt when the reference export's report names none
SYSTEM_PROMPT = ("You are a careful hospital assistant for staff. Answer in the language of the "
                 "question, follow the institution's protocols, and never invent patient data.")


def chat_messages(system: str | None, prompt: str, number: int) -> list[dict[str, str]]:
    """A request's messages: the system prompt, then the question numbered so no two repeat."""
    user = {"role": "user", "content": f"({number:06d}) {prompt}"}
    return [{"role": "system", "content": system}, user] if system else [user]


async def one_request(url: str, messages: list[dict[str, str]], max_tokens: int,
                      cache_prompt: bool = False) -> Sample:
    """One streamed greedy chat completion of exactly `max_tokens` tokens (ignore_eos).

    A bare HTTP/1.1 exchange on a new connection (`Connection: close`, read to EOF), with the
    stream scanned as bytes: the client shares the two cores with the servers, and every CPU
    microsecond it spends per event (16 streams, ~5,000 events/s) is taken from them. httpx
    cost ~160 us per event here, 5 % of a core at 16 clients, which showed up as server time.
    Only the first text chunk (TTFT) is looked for, and the usage chunk is read from the
    stream's last bytes (every server here sends each SSE event as one HTTP chunk, so the
    chunked framing never splits the usage line). A new connection per request, for every
    server alike: llama-server's HTTP library closes kept-alive connections as they are reused,
    and a loopback connect costs ~0.1 ms against requests of about a second.
    """
    started = time.perf_counter()
    ttft = None
    body = json.dumps({
        "model": "bench", "messages": messages, "stream": True,
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "stream_options": {"include_usage": True},
        # llama-server's per-request switch of its slots' prompt prefix reuse (the toolkit's
        # cache is a server setting, and it ignores the field)
        "cache_prompt": cache_prompt}).encode()
    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (host.encode(), len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        tail = b""
        while chunk := await reader.read(65536):
            tail = (tail + chunk)[-TAIL_BYTES:]
            if ttft is None and TEXT_DELTA.search(tail):
                ttft = time.perf_counter() - started
    finally:
        writer.close()
    status = head.split(b"\r\n", 1)[0]
    if status.split(b" ")[1:2] != [b"200"]:
        raise RuntimeError(f"{url}: {status!r}: {tail[-300:]!r}")
    tokens = stream_usage(tail)
    if tokens is None:
        raise RuntimeError(f"{url}: the stream carried no usage (stream_options.include_usage)")
    return Sample(ttft, time.perf_counter() - started, tokens)


def stream_usage(tail: bytes) -> int | None:
    """completion_tokens of the last SSE event with a usage object in `tail`, if any."""
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            usage = json.loads(line[6:]).get("usage")
            if usage:
                return int(usage["completion_tokens"])
    return None


#: the pass offset of the warm-up's questions (measured passes count up from 0)
WARM_UP_OFFSET = 99


def pass_messages(system: str | None, clients: int, per_client: int,
                  offset: int) -> list[list[list[dict[str, str]]]]:
    """Each client's requests in pass `offset`: request k of client i asks question number
    (offset, i, k), written in six digits (equal token counts). Unique within a server's run,
    so no prompt comes whole from a prefix cache, and the same questions for every server at
    the same pass offset."""
    if not 0 <= offset < 100 or clients > 100 or per_client > 100:
        raise ValueError("question numbers must stay six digits: pass offset < 100, at most "
                         "100 clients and 100 requests per client")
    return [[chat_messages(system, PROMPTS[(offset + index + k) % len(PROMPTS)],
                           (offset * 100 + index) * 100 + k) for k in range(per_client)]
            for index in range(clients)]


async def run_requests(send: Any, requests: list[list[Any]]) -> tuple[float, list[Sample]]:
    """One client per item of `requests`, all at once, each sending its requests back to back
    through `send`; the wall time and every sample."""
    async def worker(mine: list[Any]) -> list[Sample]:
        return [await send(request) for request in mine]

    started = time.perf_counter()
    done = await asyncio.gather(*(worker(mine) for mine in requests))
    return time.perf_counter() - started, [s for samples in done for s in samples]


async def run_pass(url: str, clients: int, per_client: int, max_tokens: int,
                   offset: int, args: argparse.Namespace) -> tuple[float, list[Sample]]:
    """`clients` concurrent clients, each sending `per_client` requests (`pass_messages`)
    back to back."""
    return await run_requests(
        lambda messages: one_request(url, messages, max_tokens,
                                     cache_prompt=args.prompt_cache == "on"),
        pass_messages(args.system_prompt, clients, per_client, offset))


def run_client(work: Any) -> Any:
    """Run the clients' coroutine on uvloop (less client CPU on the cores the servers share)."""
    import uvloop

    return uvloop.run(work)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float, path: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f}s")


def start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def toolkit_setup(export: Path, args: argparse.Namespace, speculate: bool) -> Setup:
    """The gateway serving `export` with its auto-chosen embedded engine, drafting or not."""
    from toolkit.artifacts import export_format

    fmt = export_format(export).value
    port = free_port()
    command = [sys.executable, "-m", "toolkit", "serve", str(export), "--port", str(port),
               "--max-concurrency", str(max(args.clients)), "--model-name", "bench",
               "--threads", str(args.threads), "--feedback-db", str(args.workdir / "feedback.db"),
               "--speculative-tokens", str(args.speculative_tokens if speculate else 0)]
    if args.prompt_cache == "off":
        command += ["--prefix-cache-mb", "0"]
    name = f"{export.name}{SPECULATING if speculate else ''}"
    proc = start(command, args.workdir / f"toolkit-{name}.log",
                 env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)})
    return Setup(f"toolkit {fmt}{SPECULATING if speculate else ''}", "toolkit",
                 BITS.get(fmt, fmt), f"http://127.0.0.1:{port}", proc)


def llama_setups(args: argparse.Namespace) -> list[Setup]:
    """llama-server on each quant of the reference model (building llama.cpp when needed)."""
    bin_dir = llama_server.ensure_binaries()
    ggufs = llama_server.ensure_ggufs(args.reference, bin_dir, quants=tuple(args.quants))
    setups = []
    for quant, gguf in ggufs.items():
        for speculate in speculation_modes(args):
            port = free_port()
            command = llama_server.server_command(bin_dir, gguf, port, args.threads,
                                                  max(args.clients), slot_context=512)
            command += LLAMA_NGRAM if speculate else []
            name = f"{quant}{SPECULATING if speculate else ''}"
            proc = start(command, args.workdir / f"llama-server-{name.replace(' ', '')}.log")
            setups.append(Setup(f"llama-server {name}", "llama-server", QUANT_BITS[quant],
                                f"http://127.0.0.1:{port}", proc))
    return setups


def speculation_modes(args: argparse.Namespace) -> list[bool]:
    """Whether servers run without n-gram drafts, with them, or (`both`) one of each."""
    return {"on": [True], "off": [False], "both": [False, True]}[args.speculation]


def vllm_setups(args: argparse.Namespace) -> list[Setup]:
    """The gateway over vLLM, and vLLM direct on the gateway's private port."""
    port = free_port()
    command = [sys.executable, "-m", "toolkit", "serve", str(args.reference), "--engine", "vllm",
               "--port", str(port), "--max-concurrency", str(max(args.clients)), "--model-name",
               "bench", "--vllm-python", str(args.vllm_python), "--max-model-len", "2048",
               "--feedback-db", str(args.workdir / "feedback.db")]
    proc = start(command, args.workdir / "vllm.log", env={"PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, 1800, "/ready")
    direct = f"http://127.0.0.1:{httpx.get(f'{url}/ready').json()['port']}"
    return [Setup("vllm gateway", "vllm", "fp32", url, proc),
            Setup("vllm direct", "vllm", "fp32", direct)]


def requests_per_client(clients: int, args: argparse.Namespace) -> int:
    """`--rounds`, raised so that a pass sends at least `--min-requests` requests.

    One client's pass of 2 requests lasted ~1.2 s: the machine's drift between passes (10-20 %
    on these shared cores) then decided the one-client ratios.
    """
    return max(args.rounds, -(-args.min_requests // clients))


def draft_counters(setup: Setup) -> tuple[int, int]:
    """A toolkit gateway's draft tokens so far, checked and kept (its /ready); llama-server: 0."""
    if setup.family != "toolkit":
        return 0, 0
    status = httpx.get(f"{setup.url}/ready", timeout=10).json()
    return int(status.get("draft_tokens", 0)), int(status.get("accepted_tokens", 0))


def measure(setups: list[Setup], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every setup at every level, in passes A B C .. C B A so drift hits all alike."""
    for setup in setups:  # warm-up: first requests load kernels and caches (questions of a
        # pass offset no measured pass uses, or the first pass's would come from the cache)
        run_client(run_pass(setup.url, 2, 1, 8, WARM_UP_OFFSET, args))
    rows = []
    for level, clients in enumerate(args.clients):
        tallies = {setup.name: Tally() for setup in setups}
        per_client = requests_per_client(clients, args)
        for turn, setup in enumerate(setups + setups[::-1]):
            half = turn // len(setups)  # both halves ask each server new questions
            before = draft_counters(setup)
            wall, samples = run_client(run_pass(setup.url, clients, per_client, args.max_tokens,
                                                 offset=2 * level + half, args=args))
            after = draft_counters(setup)
            tally = tallies[setup.name]
            tally.wall_s += wall
            tally.samples += samples
            tally.drafted += after[0] - before[0]
            tally.kept += after[1] - before[1]
        for setup in setups:
            row = tallies[setup.name].row(setup, clients)
            print(f"  {setup.name:<30} c={clients:<3} {row['tokens_per_s']:7.1f} tok/s  "
                  f"p50 {row['latency_p50_s']:6.2f} s  TTFT p50 {row['ttft_p50_ms']} ms  "
                  f"tokens/answer {row['answer_tokens']}  drafts kept {row['drafts_kept']}",
                  flush=True)
            rows.append(row)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "demo",
                        help="training run whose exports are served (default runs/demo)")
    parser.add_argument("--toolkit", type=Path, nargs="*", default=None,
                        help="exports served by the toolkit (default: RUN/exports/ onnx-int8, "
                             "onnx-w8a8 and onnx-int4, those present)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="transformers model converted to GGUF (default RUN/exports/merged)")
    parser.add_argument("--quants", nargs="*", default=list(llama_server.QUANTS),
                        choices=list(llama_server.QUANTS))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per pass")
    parser.add_argument("--min-requests", type=int, default=16,
                        help="requests per pass at least (more per client at low client counts)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-cache", choices=["on", "off"], default="on",
                        help="both servers reuse cached prompt prefixes (the toolkit's prefix "
                             "cache, llama-server's cache_prompt), or neither does")
    parser.add_argument("--threads", type=int, default=2, help="threads of every server")
    parser.add_argument("--speculation", choices=["on", "off", "both"], default="both",
                        help="servers draft tokens by n-gram lookup (toolkit: while at most "
                             "2 requests run, `--speculative-tokens`; llama-server: "
                             "`--spec-type ngram-simple`), or not, or both side by side (default)")
    parser.add_argument("--speculative-tokens", type=int, default=4,
                        help="the drafting gateways' --speculative-tokens")
    parser.add_argument("--vllm-python", type=Path, default=os.environ.get("TOOLKIT_VLLM_PYTHON"),
                        help="add the vLLM setups (interpreter of a venv with vllm)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-serve",
                        help="server logs and the feedback db (default runs/bench-serve)")
    parser.add_argument("--save", action="store_true",
                        help="write benchmarks/results/serve_throughput.json and the README block")
    args = parser.parse_args(argv)
    args.reference = args.reference or args.run / "exports" / "merged"
    report = args.reference / "export_report.json"
    args.system_prompt = (json.loads(report.read_text(encoding="utf-8")).get("system_prompt")
                          if report.is_file() else None) or SYSTEM_PROMPT
    if args.toolkit is None:
        args.toolkit = [args.run / "exports" / name for name in DEFAULT_EXPORTS
                        if (args.run / "exports" / name).is_dir()]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from results import render_serve_throughput, save

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.threads} threads "
          f"per server; {args.max_tokens} tokens per answer (ignore_eos); clients {args.clients}; "
          f"{args.rounds} request(s) per client per pass (at least {args.min_requests} per "
          "pass), 2 passes", flush=True)
    setups: list[Setup] = []
    try:
        setups += [toolkit_setup(export, args, speculate) for export in args.toolkit
                   for speculate in speculation_modes(args)]
        setups += llama_setups(args)
        for setup in setups:
            if setup.proc is not None:
                path = "/ready" if setup.family == "toolkit" else "/health"
                wait_ready(setup.url, setup.proc, 600, path)
        if args.vllm_python:
            setups += vllm_setups(args)
        rows = measure(setups, args)
    finally:
        for setup in setups:
            if setup.proc is not None:
                stop(setup.proc)
    settings = {"run": str(args.run), "threads": args.threads, "max_tokens": args.max_tokens,
                "rounds": args.rounds, "min_requests": args.min_requests, "passes": 2,
                "prompt_cache": args.prompt_cache, "system_prompt": args.system_prompt,
                "speculation": args.speculation, "speculative_tokens": args.speculative_tokens,
                "clients": args.clients,
                "llama_cpp": f"b{llama_server.LLAMA_TAG}",
                "llama_cmake": llama_server.cmake_options(cpu_flags())}
    unequal = [r for r in rows if r["answer_tokens"] != [args.max_tokens] * 2]
    if unequal:
        print(f"WARNING: answers of unequal length in {[r['setup'] for r in unequal]}")
    print()
    print(render_serve_throughput({"settings": settings, "rows": rows}))
    if args.save:
        save("serve_throughput", settings, rows)


if __name__ == "__main__":
    main()
