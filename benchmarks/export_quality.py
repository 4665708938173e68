"""Export the trained embedded model to every format this machine can produce, side by side.

Not a test. It exports a SmolLM2-135M training run (RUN, default runs/demo; with --train, or
when RUN does not exist, a short run is trained first) through `run_export`, so the numbers
are exactly what `toolkit export` reports, then prints one row per format with the targets:

- every 4-bit format: weights <= 35 % of the fp16 merged model (issue 14: the tied embedding
  quantized where the engine can read it, e.g. onnx-int4's GatherBlockQuantized);
- on SmolLM2-135M: perplexity delta <= +2 % for every int8 format, <= +10 % for every 4-bit one.

    .venv/bin/python benchmarks/export_quality.py [RUN] [--out DIR] [--threads 1]
        [--train] [--max-steps N] [--from-exports DIR] [--save]

`--save` writes `benchmarks/results/export_quality.json` and re-renders the README's export
table from it (`benchmarks/results.py`). `--from-exports RUN/exports` tabulates the reports that
`toolkit export` (e.g. `scripts/demo.sh`) already wrote instead of exporting again, so the
README shows exactly what the demo printed. Without `--max-steps` a run is trained with the
demo's config unchanged.

Speed is greedy batch-1 decoding with the thread count pinned (default 1): on shared cores
more threads can be slower, so unpinned numbers are not comparable.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE_TARGET_4BIT = 0.35
DELTA_TARGET = {8: 2.0, 4: 10.0}


def train_run(run: Path, max_steps: int | None) -> None:
    """The demo's LoRA run of the embedded model (the export needs a trained adapter)."""
    command = [sys.executable, "-m", "toolkit", "train", "--config",
               str(REPO / "configs/model/smollm2-135m.yaml"), "--output", str(run), "--overwrite"]
    if max_steps is not None:
        command.append(f"training.max_steps={max_steps}")
    print("training:", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def target_checks(report: dict) -> tuple[str, str]:
    """("ok"/"MISS"/"-" for size, same for perplexity delta) against the stated targets."""
    bits = (report.get("quantization") or {}).get("bits")
    size = "-"
    if bits == 4:
        size = "ok" if report["size_ratio"] <= SIZE_TARGET_4BIT else "MISS"
    delta = "-"
    if bits in DELTA_TARGET and report["perplexity_delta_pct"]["overall"] is not None:
        delta = "ok" if report["perplexity_delta_pct"]["overall"] <= DELTA_TARGET[bits] else "MISS"
    return size, delta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--out", type=Path, default=None, help="default RUN/exports-benchmark")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train", action="store_true", help="train RUN first (overwrites it)")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the demo config's")
    parser.add_argument("--from-exports", type=Path, default=None,
                        help="tabulate the export_report.json files under DIR; export nothing")
    parser.add_argument("--save", action="store_true",
                        help="write benchmarks/results/export_quality.json and the README table")
    args = parser.parse_args()

    from rich import box
    from rich.console import Console
    from rich.table import Table

    from toolkit.artifacts import Kind, has_export_report, identify, read_export
    from toolkit.export import ExportFormat, run_export
    from toolkit.export.registry import unavailable_reason

    # piped into a log, rich would assume 80 columns and truncate the numbers
    console = Console(width=None if sys.stdout.isatty() else 180)
    if args.from_exports:
        order = [f.value for f in ExportFormat]
        folders = sorted((p for p in args.from_exports.iterdir() if has_export_report(p)),
                         key=lambda p: order.index(p.name) if p.name in order else 99)
        outcomes = [(folder.name, "reused", read_export(folder).to_dict(), "")
                    for folder in folders]
        complete = bool(outcomes)
    else:
        if args.train or identify(args.run) is not Kind.run:
            train_run(args.run, args.max_steps)
        formats = [f for f in ExportFormat if unavailable_reason(f) is None]
        for fmt in ExportFormat:
            if fmt not in formats:
                console.print(f"not on this machine: {unavailable_reason(fmt)}", markup=False)
        out = args.out or args.run / "exports-benchmark"
        result = run_export(args.run, [f.value for f in formats], out=out, overwrite=True,
                            threads=args.threads, console=console)
        outcomes = [(o.format.value, o.status, o.report.to_dict() if o.report else None, o.reason)
                    for o in result.outcomes]
        complete = result.complete

    table = Table(title=f"export quality: {args.run} ({args.threads} thread(s))",
                  box=box.SIMPLE_HEAD)
    for header in ("format", "weights MB", "vs fp16", "size target", "ppl", "fr", "en",
                   "Δ ppl", "Δ fr", "Δ en", "Δ target", "tok/s", "export s", "status"):
        table.add_column(header, justify="left" if header in ("format", "status") else "right")
    rows = []
    for name, status, report, reason in outcomes:
        if report is None:
            table.add_row(name, *["-"] * 12, f"{status}: {reason}")
            rows.append({"format": name, "status": status, "reason": reason})
            continue
        size_ok, delta_ok = target_checks(report)
        ppl, delta = report["perplexity"], report["perplexity_delta_pct"]
        fmt = lambda v, spec=".2f": "-" if v is None else format(v, spec)
        pct = lambda v: "-" if v is None else f"{v:+.1f} %"
        table.add_row(name, fmt(report["weights_bytes"] / 1e6, ".1f"),
                      f"{report['size_ratio']:.0%}", size_ok, fmt(ppl["overall"]), fmt(ppl["fr"]),
                      fmt(ppl["en"]), pct(delta["overall"]), pct(delta["fr"]), pct(delta["en"]),
                      delta_ok, fmt(report["speed"]["tokens_per_s"], ".1f"),
                      fmt(report["export_seconds"], ".0f"), report["quality"]["verdict"])
        rows.append({"format": name, "status": status,
                     "weights_bytes": report["weights_bytes"], "size_ratio": report["size_ratio"],
                     "perplexity": {k: ppl[k] for k in ("overall", "fr", "en")},
                     "delta_pct": delta, "tokens_per_s": report["speed"]["tokens_per_s"],
                     "export_seconds": report["export_seconds"], "size_target": size_ok,
                     "delta_target": delta_ok, "verdict": report["quality"]["verdict"]})
    console.print(table)
    if args.save:
        from results import save

        save("export_quality", {"run": str(args.run), "threads": args.threads,
                                "reports_from": str(args.from_exports or "a fresh export")}, rows)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
