"""Benchmark results as files, so that no measured figure in the docs can go stale.

Each benchmark saves what it measured as `benchmarks/results/NAME.json` (`save`), together with
the machine and software it ran on: date, CPU model and its relevant ISA flags, commit and
package versions. `benchmarks/RESULTS.md` and the blocks of the README between
`<!-- results:NAME -->` and `<!-- /results:NAME -->` are rendered from those files only:

    .venv/bin/python benchmarks/results.py           # re-render RESULTS.md and the README blocks
    .venv/bin/python benchmarks/results.py --check   # exit 1 when either differs from the JSON

`tests/test_benchmark_results.py` runs the same check, so a README edited by hand, or a result
saved without re-rendering, fails the suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from toolkit.cpu import cpu_flags, cpu_model

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
README = REPO / "README.md"
#: the ISA features that change which CPU kernels torch/oneDNN/ONNX Runtime run
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
PACKAGES = ("torch", "transformers", "peft", "onnxruntime", "bitsandbytes", "gptqmodel")
BLOCK = re.compile(r"(<!-- results:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)",
                   re.DOTALL)


def environment() -> dict[str, Any]:
    """Where a result was measured: enough to tell whether two results are comparable."""
    flags = cpu_flags()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=False).stdout.strip() or "unknown"
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "cpu": cpu_model() or "unknown",
        "cpu_count": os.cpu_count(),
        # other work on the same cores slows every speed figure: say how busy they were
        "load_avg_1m": round(os.getloadavg()[0], 1),
        "isa": [flag for flag in ISA_FLAGS if flag in flags],
        "commit": commit,
        "python": platform.python_version(),
        "packages": versions,
    }


def save(name: str, settings: dict[str, Any], rows: list[dict[str, Any]],
         results_dir: Path = RESULTS_DIR) -> Path:
    """Write one benchmark's rows with its settings and environment, then re-render the docs."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    payload = {"benchmark": name, "environment": environment(), "settings": settings, "rows": rows}
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if results_dir == RESULTS_DIR:
        write_all()
    print(f"results: saved {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return path


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f} %"


def render_export_quality(data: dict[str, Any]) -> str:
    """The export table: size, perplexity (fr/en), delta against the merged model, speed."""
    lines = ["| format | MB | vs fp16 | ppl | fr | en | Δ ppl | Δ fr | Δ en | target | tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        if row.get("status") not in ("ok", "exported", "reused"):
            lines.append(f"| {row['format']} | - | - | - | - | - | - | - | - | "
                         f"{row.get('status')}: {row.get('reason', '')} | - |")
            continue
        ppl, delta = row["perplexity"], row["delta_pct"]
        lines.append(
            f"| {row['format']} | {_num(row['weights_bytes'] / 1e6, '.0f')} | "
            f"{row['size_ratio']:.0%} | {_num(ppl['overall'], '.2f')} | {_num(ppl['fr'], '.2f')} | "
            f"{_num(ppl['en'], '.2f')} | {_pct(delta['overall'])} | {_pct(delta['fr'])} | "
            f"{_pct(delta['en'])} | {row['delta_target']} | {_num(row['tokens_per_s'], '.1f')} |")
    settings = data["settings"]
    lines.append("")
    lines.append(f"Run `{settings['run']}`, {settings['threads']} thread(s), batch-1 greedy; "
                 f"target: Δ ppl <= +2 % (int8), <= +10 % (4-bit).")
    return "\n".join(lines)


def render_train_throughput(data: dict[str, Any]) -> str:
    """Toolkit's trainer against the plain Trainer + peft baselines: tokens/s, RSS, loss."""
    lines = ["| variant | precision | tokens/s | peak RSS GiB | held-out loss | toolkit speed-up |",
             "|---|---|---|---|---|---|"]
    rows = {row["variant"]: row for row in data["rows"]}
    ours = rows["toolkit"]
    for name, row in rows.items():
        ratio = "-" if name == "toolkit" else f"{ours['tokens_per_s'] / row['tokens_per_s']:.2f}x"
        lines.append(f"| {name} | {row['precision']} | {row['tokens_per_s']:.0f} | "
                     f"{row['peak_rss_bytes'] / 2**30:.2f} | {row['eval_loss']:.4f} | {ratio} |")
    settings = data["settings"]
    lines.append("")
    lines.append(f"{settings['steps']} optimizer steps per variant, {settings['threads']} torch "
                 f"thread(s); target: toolkit >= 1.5x tokens/s at no higher RSS or loss.")
    return "\n".join(lines)


def render_onnx_decode(data: dict[str, Any]) -> str:
    """Old (optimum graph, KV copied per step) vs new (GQA graph, KV in place) decode paths."""
    lines = [("| batch | path | ms/step | in ORT | Python around it | step tok/s | served tok/s | "
              "new / old served | greedy = old |"), "|---|---|---|---|---|---|---|---|---|"]
    old = {row["batch"]: row for row in data["rows"] if row["path"] == "old"}
    for row in data["rows"]:
        ratio = "-" if row["path"] == "old" else \
            f"{row['serve_tokens_per_s'] / old[row['batch']]['serve_tokens_per_s']:.2f}x"
        lines.append(f"| {row['batch']} | {row['path']} | {row['step_ms']:.1f} | "
                     f"{row['ort_ms']:.1f} | {row['python_ms']:.2f} | {row['tokens_per_s']:.0f} | "
                     f"{row['serve_tokens_per_s']:.0f} | {ratio} | "
                     f"{'yes' if row['greedy_equal_to_old'] else 'no'} |")
    settings = data["settings"]
    lines.append("")
    lines.append(f"{settings['tokens']} tokens per answer, {settings['threads']} ORT threads, "
                 f"{settings['rounds']} A B B A round(s); served = `BatchScheduler` without HTTP, "
                 "every request forced to the full length.")
    return "\n".join(lines)


def render_vllm_quantized(data: dict[str, Any]) -> str:
    """vLLM-CPU on compressed-tensors exports against vLLM on the bf16 model, same run."""
    lines = ["| model | loaded | generated | tok/s | x bf16 | ppl | Δ ppl | Δ fr | Δ en | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        ppl, delta = row["perplexity"], row["delta_pct"]
        note = (row.get("error") or "").replace("|", "/")
        lines.append(
            f"| {row['model']} | {'yes' if row['loaded'] else 'no'} | "
            f"{'yes' if row['generated'] else 'no'} | {_num(row['tokens_per_s'], '.1f')} | "
            f"{_num(row['speedup'], '.2f')} | {_num(ppl['overall'], '.2f')} | "
            f"{_pct(delta['overall'])} | {_pct(delta['fr'])} | {_pct(delta['en'])} | {note} |")
    settings = data["settings"]
    target = settings["target"]
    lines.append("")
    lines.append(f"Reference `{settings['reference']}` served as bf16; {settings['tokens']} greedy "
                 f"tokens, batch 1, {settings['threads']} thread(s), best of {settings['rounds']} "
                 f"interleaved rounds; perplexity from vLLM's prompt logprobs on `{settings['eval']}`. "
                 f"Target: W8A8 >= {target['speedup']}x bf16 tokens/s at <= +{target['delta_pct']:g} %.")
    return "\n".join(lines)


def render_onnx_int4_choice(data: dict[str, Any]) -> str:
    """Each onnx-int4 recipe: Δ perplexity fr/en, size vs fp16, decode speed vs onnx-int8."""
    settings = data["settings"]
    targets = settings["targets"]
    lines = ["| recipe | Δ fr | Δ en | vs fp16 | tok/s | vs onnx-int8 | quantize s | targets |",
             "|---|---|---|---|---|---|---|---|"]
    int8 = settings["onnx_int8"]
    lines.append(f"| onnx-int8 (baseline) | {_pct(int8['delta_fr_pct'])} | "
                 f"{_pct(int8['delta_en_pct'])} | {int8['size_vs_fp16_pct']:.0f} % | "
                 f"{_num(int8.get('tokens_per_s'), '.1f')} | 1.00x | - | - |")
    for row in data["rows"]:
        if "error" in row:
            lines.append(f"| {row['recipe']} | failed: {row['error']} | | | | | | |")
            continue
        ratio = row.get("vs_onnx_int8")
        missed = [name for name, miss in (
            ("fr", row["delta_fr_pct"] > targets["delta_pct"]),
            ("en", row["delta_en_pct"] > targets["delta_pct"]),
            ("size", row["size_vs_fp16_pct"] > 100 * targets["size_vs_fp16"]),
            ("speed", ratio is not None and ratio < targets["vs_onnx_int8"])) if miss]
        lines.append(
            f"| {row['recipe']}{' **(chosen)**' if row.get('chosen') else ''} | "
            f"{_pct(row['delta_fr_pct'])} | {_pct(row['delta_en_pct'])} | "
            f"{row['size_vs_fp16_pct']:.0f} % | {_num(row.get('tokens_per_s'), '.1f')} | "
            f"{_num(ratio, '.2f')}{'x' if ratio is not None else ''} | "
            f"{row['quantize_s']:.0f} | {'miss ' + ', '.join(missed) if missed else 'all met'} |")
    ref = settings["reference_ppl"]
    lines.append("")
    lines.append(
        f"Model `{settings['model']}` (fp32 builder graph ppl fr {ref['fr']:.2f}, "
        f"en {ref['en']:.2f}); "
        f"{settings['threads']} thread, {settings['new_tokens']} greedy tokens, speed ratio = "
        f"median over {settings['rounds']} A B B A rounds against onnx-int8 in the same process. "
        f"Targets: Δ fr and Δ en <= +{targets['delta_pct']:.0f} %, <= "
        f"{100 * targets['size_vs_fp16']:.0f} % of fp16, >= onnx-int8's speed.")
    return "\n".join(lines)


def render_quant_methods(data: dict[str, Any]) -> str:
    """The quantization method table: size, perplexity delta fr/en, speed against merged."""
    header = ("| variant | MB | vs fp16 | ppl | Δ fr | Δ en | Δ ppl | tok/s | vs merged | "
              "quantize s | kernel |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        if row.get("status") != "ok":
            lines.append(f"| {row['variant']} | - | - | - | - | - | - | - | - | - | "
                         f"{row.get('status')}: {row.get('reason', '')} |")
            continue
        delta = row["delta_pct"]
        lines.append(
            f"| {row['variant']} | {row['weights_bytes'] / 1e6:.0f} | {row['size_ratio']:.0%} | "
            f"{row['perplexity']['overall']:.2f} | {_pct(delta['fr'])} | {_pct(delta['en'])} | "
            f"{_pct(delta['overall'])} | {row['tokens_per_s']:.1f} | "
            f"{row['speed_vs_merged']:.2f}x | {row['quantize_s']:.0f} | "
            f"{', '.join(row['kernels'])} |")
    settings = data["settings"]
    ref = settings.get("reference_perplexity") or {}
    lines.append("")
    lines.append(f"Reference: `{settings['run']}` merged fp16, ppl {_num(ref.get('overall'), '.2f')} "
                 f"(fr {_num(ref.get('fr'), '.2f')}, en {_num(ref.get('en'), '.2f')}); "
                 f"{settings['threads']} thread(s), batch-1 greedy, speed as a ratio to the merged "
                 "model timed in interleaved rounds on shared cores. Targets: 4-bit Δ fr and "
                 "Δ en <= +10 % at <= 35 % of fp16; int8 <= +2 %." +
                 (f" {settings['note']}" if settings.get("note") else ""))
    return "\n".join(lines)


def serve_ratios(rows: list[dict[str, Any]]) -> list[tuple[str, dict[int, float]]]:
    """tok/s ratios toolkit / llama-server at the same bit width, per client count.

    A toolkit setup drafting n-gram tokens (" +ngram") is compared with llama-server both
    without drafts (the issue's anchor) and with its own; one without drafts only with
    llama-server without.
    """
    by = {(r["setup"], r["clients"]): r["tokens_per_s"] for r in rows}
    ours = dict.fromkeys(r["setup"] for r in rows if r["family"] == "toolkit")
    anchors = dict.fromkeys(r["setup"] for r in rows if r["family"] == "llama-server")
    bits = {r["setup"]: r["bits"] for r in rows}
    clients = sorted({r["clients"] for r in rows})
    out = []
    for mine in ours:
        for anchor in (a for a in anchors if bits[a] == bits[mine]
                       and (_drafting(mine) or not _drafting(a))):
            out.append((f"{mine} / {anchor}", {c: by[(mine, c)] / by[(anchor, c)] for c in clients
                                                if (mine, c) in by and (anchor, c) in by}))
    return out


def _drafting(setup: str) -> bool:
    """A setup served with n-gram drafts (serve_throughput's SPECULATING suffix)."""
    return setup.endswith(" +ngram")


def render_serve_throughput(data: dict[str, Any]) -> str:
    """Toolkit gateway vs llama-server: tok/s, latency, TTFT per level; same-width ratios."""
    rows, settings = data["rows"], data["settings"]
    clients = sorted({r["clients"] for r in rows})
    lines = [("| setup | bits | clients | tok/s | p50 latency s | TTFT p50 ms | tokens/answer "
              "| drafts kept |"), "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        low, high = row["answer_tokens"]
        lines.append(f"| {row['setup']} | {row['bits']} | {row['clients']} | "
                     f"{row['tokens_per_s']:.1f} | {row['latency_p50_s']:.2f} | "
                     f"{_num(row['ttft_p50_ms'], '.0f')} | {low if low == high else f'{low}-{high}'} "
                     f"| {row.get('drafts_kept') or '-'} |")
    lines += ["", "| tok/s ratio | " + " | ".join(f"{c} client(s)" for c in clients) + " |",
              "|---|" + "---|" * len(clients)]
    for name, ratios in serve_ratios(rows):
        lines.append(f"| {name} | " + " | ".join(_num(ratios.get(c), ".2f") for c in clients) + " |")
    lo, hi = min(clients), max(clients)
    by = {(r["setup"], r["clients"]): r["tokens_per_s"] for r in rows}
    scaling = [f"{setup} {by[(setup, hi)] / by[(setup, lo)]:.1f}x"
               for setup in dict.fromkeys(r["setup"] for r in rows)
               if (setup, lo) in by and (setup, hi) in by]
    lines += ["", f"{hi} clients / {lo}: {', '.join(scaling)}.", "",
              (f"{settings['threads']} threads per server, greedy, {settings['max_tokens']}-token "
               f"answers (ignore_eos), {settings['rounds']} request(s) per client per pass"
               + (f" and at least {settings['min_requests']} per pass" if "min_requests" in settings
                  else "") + ", passes "
               f"interleaved A B .. B A; llama.cpp {settings['llama_cpp']} built from source. "
               + _prompt_cache_sentence(settings.get("prompt_cache")) +
               "Targets: toolkit >= 1.0x llama-server at the same bit width; "
               f"{hi} clients >= 3x one.")]
    return "\n".join(lines)


def _prompt_cache_sentence(mode: str | None) -> str:
    """What the requests were and how they met the servers' prompt caches (`--prompt-cache`;
    runs saved before the switch had none)."""
    if mode is None:
        return "Six user-only prompts, repeated; prompt caches off. "
    return ("Requests: the run's system prompt and a question no other request repeats; prompt "
            + ("caches on (toolkit prefix cache, llama-server cache_prompt). " if mode == "on"
               else "caches off (both servers prefill every prompt whole). "))


def render_speculation(data: dict[str, Any]) -> str:
    """One client, drafts off vs on in one process: tok/s, speedup, drafts kept, same answers."""
    lines = _table(
        ["export", "tok/s without drafts", "with drafts", "speedup", "drafts kept",
         "steps per 100 tokens", "identical answers"],
        ([row["export"], f"{row['off_tokens_per_s']:.1f}", f"{row['on_tokens_per_s']:.1f}",
          f"{row['speedup']:.2f}x", row["drafts_kept"],
          f"{row['steps_per_100_tokens']['off']} -> {row['steps_per_100_tokens']['on']}",
          row["identical_answers"]] for row in data["rows"]))
    settings = data["settings"]
    lines += ["", (f"One request at a time, {settings['threads']} threads, "
                   f"{settings['max_tokens']}-token greedy answers (ignore_eos) to "
                   f"serve_throughput's requests, {settings['requests']} per pass, passes A B B A "
                   f"x {settings['rounds']}; drafts of up to {settings['speculative_tokens']} "
                   "tokens (`--speculative-tokens`); speedup > 1: drafting faster.")]
    return "\n".join(lines)


def render_gateway_overhead(data: dict[str, Any]) -> str:
    """The same engine through the HTTP gateway vs called in-process: tok/s, overhead (with its
    spread over the interleaved blocks), batching, and the gateway's own CPU."""
    lines = [("| export | clients | direct tok/s | gateway tok/s | overhead (blocks) | p50 s direct "
              "/ gateway | rows per step | prefills | event loop CPU per request |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        blocks = row["overhead_by_block_pct"]
        lines.append(
            f"| {row['export']} | {row['clients']} | {row['direct_tokens_per_s']:.1f} | "
            f"{row['gateway_tokens_per_s']:.1f} | {_pct(row['overhead_pct'])} "
            f"({min(blocks):+.1f}..{max(blocks):+.1f}) | "
            f"{row['direct_latency_p50_s']:.2f} / {row['gateway_latency_p50_s']:.2f} | "
            f"{row['direct_rows_per_step']} / {row['gateway_rows_per_step']} | "
            f"{row['direct_prefills']} / {row['gateway_prefills']} | "
            f"{row['gateway_loop_ms_per_request']:.1f} ms, {row['loop_cpu_pct']:.1f} % of "
            f"direct's {row['direct_cpu_ms_per_request']:.0f} |")
    settings = data["settings"]
    lines += ["", (f"{settings['threads']} engine threads, {settings['rounds']} requests per "
                   f"client per pass, {settings['max_tokens']}-token greedy answers (ignore_eos), "
                   "streamed, serve_throughput's system prompt and never-repeated questions; overhead "
                   "= 1 - gateway / direct tok/s over all passes, interleaved "
                   f"A B B A x {settings['blocks']} blocks (range: the blocks' own overheads); "
                   "target < 5 %. Rows per step and prefills: the engine's counters, direct / "
                   "gateway. Event loop CPU: the server's main thread (HTTP, validation, SSE, "
                   "metrics) per request, against the direct process's CPU per request.")]
    return "\n".join(lines)


def _table(columns: list[str], rows: Iterable[list[str]]) -> list[str]:
    """The lines of a Markdown table."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def render_matmul_kernels(data: dict[str, Any]) -> str:
    """ORT's weight-only matmul kernels against fp32 SGEMM at serving's row counts."""
    lines = _table(["kernel", "rows", "ms per layer", "vs fp32", "batch gain"],
                   ([row["kernel"], str(row["rows"]), f"{row['ms_per_layer']:.3f}",
                     f"{row['vs_fp32']:.2f}x", f"{row['batch_gain']:.1f}x"] for row in data["rows"]))
    settings = data["settings"]
    lines += ["", (f"One {settings['config']} decoder layer's matmuls (in, out: "
                   f"{', '.join(f'{k}x{n}' for k, n in settings['shapes'])}), "
                   f"{settings['threads']} threads, median of {settings['rounds']} interleaved "
                   "rounds; vs fp32 > 1 is faster than SGEMM; batch gain = rows/s at that many "
                   "rows over rows/s at one.")]
    return "\n".join(lines)


def render_huge_pages(data: dict[str, Any]) -> str:
    """One-row decode steps with the weights in huge pages against the same graph without."""
    lines = _table(["export", "weights in huge pages", "step without", "step with", "speedup"],
                   ([row["export"], f"{row['huge_mb']} MB", f"{row['base_step_ms']:.2f} ms",
                     f"{row['huge_step_ms']:.2f} ms", f"{row['speedup']:.2f}x"]
                    for row in data["rows"]))
    settings = data["settings"]
    lines += ["", (f"One process per export, both sessions in it, {settings['threads']} threads, "
                   f"median step of {settings['tokens']} greedy tokens at one row, median of "
                   f"{settings['rounds']} interleaved rounds; speedup > 1: huge pages faster.")]
    return "\n".join(lines)


def render_prefill_batching(data: dict[str, Any]) -> str:
    """Bursts of 16 prompts prefilled in runs of similar lengths against one padded run."""
    lines = _table(["export", "burst", "prompt tokens", "one run", "runs of similar lengths",
                    "speedup"],
                   ([row["export"], row["burst"],
                     f"{row['prompt_tokens'][0]}-{row['prompt_tokens'][1]}",
                     f"{row['one_run_ms']:.0f} ms", f"{row['served_ms']:.0f} ms",
                     f"{row['speedup']:.2f}x"] for row in data["rows"]))
    settings = data["settings"]
    lines += ["", (f"Both groupings on one backend per export, prefix cache on (the system prompt cached), "
                   f"{settings['threads']} threads, median of {settings['rounds']} interleaved "
                   "rounds; speedup > 1: the served grouping (`padded_runs`) is faster.")]
    return "\n".join(lines)


def render_integer_weights(data: dict[str, Any]) -> str:
    """An integer-GEMM export's decode steps and prefills, weights as stored against retyped."""
    settings = data["settings"]
    lines = _table(["rows", "step, stored", f"step, {settings['retyped_sign']} weights",
                    "step speedup", "prefill, stored", f"prefill, {settings['retyped_sign']}",
                    "prefill speedup"],
                   ([str(row["rows"]), f"{row['stored_step_ms']:.2f} ms",
                     f"{row['retyped_step_ms']:.2f} ms", f"{row['step_speedup']:.2f}x",
                     f"{row['stored_prefill_ms']:.0f} ms", f"{row['retyped_prefill_ms']:.0f} ms",
                     f"{row['prefill_speedup']:.2f}x"] for row in data["rows"]))
    lines += ["", (f"`{Path(settings['export']).name}` opened twice in one process: its weights "
                   f"as stored (uint8) and as the engine opens it on this CPU "
                   f"({settings['retyped_sign']}); {settings['threads']} threads, median step of "
                   f"{settings['tokens']} greedy tokens and one prefill of as many chat prompts "
                   f"as rows, median of {settings['rounds']} A B B A rounds; both picked the "
                   "same tokens; speedup > 1: retyped faster.")]
    return "\n".join(lines)


#: every name here has a saved result and a README block (tests/test_benchmark_results.py)
RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "export_quality": render_export_quality,
    "gateway_overhead": render_gateway_overhead,
    "onnx_decode": render_onnx_decode,
    "train_throughput": render_train_throughput,
    "vllm_quantized": render_vllm_quantized,
    "onnx_int4_choice": render_onnx_int4_choice,
    "quant_methods": render_quant_methods,
    "quant_methods_demo": render_quant_methods,
    "serve_throughput": render_serve_throughput,
    "matmul_kernels": render_matmul_kernels,
    "matmul_kernels_vnni": render_matmul_kernels,
    "huge_pages": render_huge_pages,
    "prefill_batching": render_prefill_batching,
    "integer_weights": render_integer_weights,
    "speculation": render_speculation,
}


def load(name: str, results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    return json.loads((results_dir / f"{name}.json").read_text(encoding="utf-8"))


def provenance(data: dict[str, Any]) -> str:
    """One line naming where and when a result was measured."""
    env = data["environment"]
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    return (f"_Measured {env['date']} at commit {env['commit']} on {env['cpu']} "
            f"({env['cpu_count']} cores; {' '.join(env['isa']) or 'no AVX2'}; load average "
            f"{env['load_avg_1m']} when saved), Python {env['python']}, {packages}. "
            f"Source: `benchmarks/results/{data['benchmark']}.json`._")


def render_block(name: str, results_dir: Path = RESULTS_DIR) -> str:
    """What stands between a README's markers for `name`: the table and its provenance."""
    data = load(name, results_dir)
    return f"{RENDERERS[name](data)}\n\n{provenance(data)}\n"


def render_results_md(results_dir: Path = RESULTS_DIR) -> str:
    """The whole `benchmarks/RESULTS.md`: one section per saved result."""
    parts = ["# Benchmark results", "",
             "Generated by `benchmarks/results.py` from `benchmarks/results/*.json`; do not edit.", ""]
    for path in sorted(results_dir.glob("*.json")):
        name = path.stem
        if name in RENDERERS:
            parts += [f"## {name}", "", render_block(name, results_dir)]
    return "\n".join(parts)


def render_readme(text: str, results_dir: Path = RESULTS_DIR) -> str:
    """`text` with every results block that has a JSON file re-rendered from it."""
    def render(match: re.Match[str]) -> str:
        if not (results_dir / f"{match.group('name')}.json").is_file():
            return match.group(0)
        return match.group(1) + render_block(match.group("name"), results_dir) + match.group(4)

    return BLOCK.sub(render, text)


def stale(readme: Path = README, results_md: Path = RESULTS_MD,
          results_dir: Path = RESULTS_DIR) -> list[str]:
    """The generated files that differ from what the JSON results render to."""
    problems = []
    text = readme.read_text(encoding="utf-8")
    names = [match.group("name") for match in BLOCK.finditer(text)]
    if not names:
        problems.append(f"{readme.name} has no results block")
    problems += [f"benchmarks/results/{name}.json (missing)" for name in names
                 if not (results_dir / f"{name}.json").is_file()]
    if problems:
        return problems
    if render_readme(text, results_dir) != text:
        problems.append(f"{readme.name}'s results blocks")
    if not results_md.is_file() or results_md.read_text(encoding="utf-8") != render_results_md(results_dir):
        problems.append(results_md.name)
    return problems


def write_all() -> None:
    """Re-render RESULTS.md and the README blocks from the JSON files."""
    RESULTS_MD.write_text(render_results_md(), encoding="utf-8")
    README.write_text(render_readme(README.read_text(encoding="utf-8")), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when stale")
    args = parser.parse_args()
    if args.check:
        problems = stale()
        if problems:
            print(f"results: out of date: {', '.join(problems)}; run "
                  f"`.venv/bin/python benchmarks/results.py`", file=sys.stderr)
            return 1
        return 0
    write_all()
    print(f"results: rendered {RESULTS_MD.relative_to(REPO)} and the README blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
