"""Pick the gptq-int4, bnb-nf4 and bnb-int8 settings: every method variant, measured alike.

Not a test. Each variant quantizes the merged fp16 export of a training run (default
runs/demo/exports/merged) with the exporters' own functions (`toolkit.export.gptq.quantize_gptq`,
`toolkit.export.bnb.quantize_bnb`; HQQ through transformers' `HqqConfig`), reloads it the way
`toolkit export` verifies it (`toolkit.runtime.loading`), and scores it on the same held-out
examples and perplexity code as the export reports (fr and en apart), against the merged model
measured in the same run. Calibration: every example of data/train.jsonl (both languages),
rendered as `toolkit export` renders them. Size: weight files against the fp16 parameter bytes.
Speed: greedy batch-1 tok/s with --threads pinned, as a ratio to the merged model timed in
interleaved rounds (merged, variant, variant, merged), because other jobs share the cores.

    .venv/bin/python benchmarks/quant_methods.py [--run runs/demo] [--only SUBSTR ...]
        [--work DIR] [--threads 1] [--tabulate] [--save] [--result NAME]

Rows are appended to WORK/rows.jsonl as they are measured and a rerun skips the variants already
there, so a long run can be stopped and resumed; `--save` writes
`benchmarks/results/quant_methods.json` (and the README/RESULTS.md block) from them.
Time on 2 cores: a bitsandbytes row takes ~1 min quiet (2-4 min with four other jobs on the
cores), an HQQ row ~2 min (4 min), a GPTQ row ~2-3 min quiet (the demo's gptq-int4 export:
128 s) but over an hour with the cores shared five ways; all 33 rows, quiet: about an hour.
HQQ rows need `pip install hqq` (not in the toolkit's locks: no shipped format uses it); without
it they are recorded as skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: import this checkout's toolkit
    sys.path.insert(0, str(REPO))

#: a 135M model has 30 blocks: "first" and "last" are the ones quantization error hits hardest
FIRST_LAST_BLOCKS = r"model\.layers\.(0|1|28|29)\."
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Variant:
    """One quantization method variant.

    Attributes:
        name: the table row.
        family: "gptq", "bnb" or "hqq".
        overrides: settings changed from the exporter's defaults (`gptq_settings`,
            `int8_settings`, `nf4_settings`).
        note: what the row is there to show.
    """

    name: str
    family: str
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def _keep(*patterns: str) -> list[str]:
    """bitsandbytes skip list: `patterns` stay 16-bit, and so does the tied lm_head."""
    return ["lm_head", *patterns]


def variants() -> list[Variant]:
    """Every variant, in run order: the shipped defaults and the likeliest winners first, so
    a run stopped early (`rows.jsonl` resumes) has measured what decides the defaults."""
    nf4_sensitivity = [Variant(f"bnb-nf4 dq, {name} 16-bit", "bnb",
                               {"bits": 4, "skip_modules": _keep(name)}, "sensitivity")
                       for name in LINEARS if name != "down_proj"]
    return [
        Variant("bnb-int8 t6 (default)", "bnb", {"bits": 8}),
        Variant("bnb-nf4 dq (default)", "bnb", {"bits": 4}),
        Variant("gptq g32 sym (default)", "gptq", {}),
        Variant("gptq g32 asym", "gptq", {"sym": False},
                "the base weights are a dequantized Q4_1 GGUF: asymmetric blocks of 32; "
                "vLLM's GPTQ loader takes symmetric checkpoints only"),
        Variant("gptq g64 sym (former default)", "gptq", {"group_size": 64}),
        Variant("hqq 4-bit g64", "hqq", {"nbits": 4, "group_size": 64}),
        Variant("bnb-int8 t3", "bnb", {"bits": 8, "llm_int8_threshold": 3.0}),
        Variant("bnb-int8 t6, down_proj 16-bit", "bnb",
                {"bits": 8, "skip_modules": _keep("down_proj")}),
        Variant("bnb-nf4 dq, down_proj 16-bit", "bnb",
                {"bits": 4, "skip_modules": _keep("down_proj")}, "sensitivity"),
        Variant("bnb-nf4 dq, blocks 0,1,28,29 16-bit", "bnb",
                {"bits": 4, "skip_modules": _keep(FIRST_LAST_BLOCKS)}, "sensitivity"),
        Variant("gptq g32 sym, desc_act", "gptq", {"desc_act": True, "act_group_aware": False}),
        Variant("hqq 4-bit g32", "hqq", {"nbits": 4, "group_size": 32}),
        Variant("bnb-int8 t0 (no fp16 outliers)", "bnb", {"bits": 8, "llm_int8_threshold": 0.0}),
        Variant("bnb-int8 t1", "bnb", {"bits": 8, "llm_int8_threshold": 1.0}),
        Variant("bnb-nf4 no dq", "bnb", {"bits": 4, "double_quant": False}),
        Variant("bnb-fp4 dq", "bnb", {"bits": 4, "scheme": "fp4"}),
        *nf4_sensitivity,
        Variant("gptq g32, damp 0.01", "gptq", {"group_size": 32, "damp_percent": 0.01}),
        Variant("gptq g32, damp 0.10", "gptq", {"group_size": 32, "damp_percent": 0.10}),
        Variant("gptq g32, mse 2.4", "gptq", {"group_size": 32, "mse": 2.4}),
        Variant("gptq g32, act-group-aware off", "gptq", {"act_group_aware": False}),
        Variant("gptq g32, true_sequential off", "gptq",
                {"group_size": 32, "true_sequential": False}),
        Variant("gptq g32, half the calibration examples", "gptq",
                {"group_size": 32, "calibration_fraction": 0.5}),
        Variant("gptq g32, down_proj 8-bit", "gptq",
                {"group_size": 32, "dynamic": {r"+:.*\.down_proj": {"bits": 8}}}),
        Variant("gptq g32, lm_head 4-bit", "gptq", {"group_size": 32, "lm_head": True}),
        Variant("bnb-int8 t6, blocks 0,1,28,29 16-bit", "bnb",
                {"bits": 8, "skip_modules": _keep(FIRST_LAST_BLOCKS)}),
        Variant("bnb-nf4 dq, compute fp32", "bnb", {"bits": 4, "compute_dtype": "float32"},
                "a CPU reload computes in fp32 whatever was saved"),
        Variant("bnb-nf4 dq, storage bf16", "bnb", {"bits": 4, "quant_storage": "bfloat16"}),
    ]


@dataclass
class Bench:
    """What every variant is measured against, loaded once."""

    reference_dir: Path
    source: Any
    encoded: list[Any]
    speed_prompt: list[int]
    texts: list[str]
    by_language: dict[str, int]
    fp16_bytes: int
    reference: Any
    reference_ppl: dict[str, Any]
    threads: int
    new_tokens: int
    rounds: int


def setup(args: argparse.Namespace) -> Bench:
    """Load the merged reference, encode the held-out set and render the calibration texts."""
    import torch

    from toolkit.evaluation import perplexity
    from toolkit.export.calibration import calibration_texts
    from toolkit.export.quality import parameter_count, ppl_summary
    from toolkit.export.runner import encode_eval
    from toolkit.export.source import resolve_source
    from toolkit.runtime.loading import load_export, load_tokenizer

    torch.set_num_threads(args.threads)
    source = resolve_source(args.run)
    reference_dir = args.run / "exports" / "merged"
    encoded, _, speed_prompt = encode_eval(source, args.eval)
    texts, info = calibration_texts(args.calibration, load_tokenizer(reference_dir),
                                    source.system_prompt)
    reference = load_export(reference_dir, fmt="merged", device="cpu")
    # scored once per work folder: a resumed run compares with the same figures
    cached = args.work / "reference.json"
    saved = json.loads(cached.read_text()) if cached.is_file() else {}
    if saved.get("reference") == str(reference_dir.resolve()):
        ppl = saved["perplexity"]
    else:
        ppl = ppl_summary(perplexity(reference.logits_fn, encoded))
        cached.write_text(json.dumps({"reference": str(reference_dir.resolve()),
                                      "perplexity": ppl}))
    print(f"reference {reference_dir}: ppl {ppl['overall']:.2f} (fr {ppl['fr']:.2f}, "
          f"en {ppl['en']:.2f}) on {ppl['tokens']} tokens; calibration {len(texts)} examples "
          f"{info['by_language']}", flush=True)
    return Bench(reference_dir, source, encoded, speed_prompt, texts, info["by_language"],
                 parameter_count(reference_dir) * 2, reference, ppl, args.threads,
                 args.new_tokens, args.rounds)


def quantize(bench: Bench, variant: Variant, out: Path) -> dict[str, Any]:
    """Write a GPTQ or bitsandbytes `variant` to `out`; returns the full settings used."""
    import torch

    from toolkit.export import bnb, gptq

    if variant.family == "bnb":
        base = bnb.int8_settings() if variant.overrides["bits"] == 8 else bnb.nf4_settings("float16")
        settings = {**base, **variant.overrides}
        settings["quantized_modules"] = bnb.quantize_bnb(bench.reference_dir, out, settings,
                                                         dtype="float16")
        return settings
    settings = gptq.gptq_settings(bench.reference_dir)
    settings.update(variant.overrides)
    fraction = settings.pop("calibration_fraction", 1.0)
    # every other example: the half set keeps both languages
    texts = bench.texts if fraction == 1.0 else bench.texts[::round(1 / fraction)]
    settings["calibration_examples"] = len(texts)
    source = bench.reference_dir
    if settings["lm_head"]:
        # gptqmodel refuses a tied lm_head ("tied_weights=True ... not supported")
        source = untied_copy(bench.reference_dir, out.parent / f"{out.name}-untied")
    gptq.quantize_gptq(source, out, settings, texts, dtype=torch.float16)
    if source != bench.reference_dir:
        shutil.rmtree(source)
    return settings


def untied_copy(model_dir: Path, out: Path) -> Path:
    """`model_dir` saved with its own lm_head weight (a copy of the tied embedding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16)
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def quantize_hqq(reference_dir: Path, settings: dict[str, Any]) -> tuple[Any, int]:
    """HQQ every decoder linear layer in memory; (model, bytes its weights would take).

    transformers 5.24's `HqqConfig` cannot quantize on load (its HQQ quantizer has no
    `get_quantize_ops`: "HQQ is not available yet"), so the layers are swapped for hqq's
    `HQQLinear` directly. Size: packed weights + fp16 scale/zero per group + the fp16
    tensors left (embedding, norms).
    """
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
    from transformers import AutoModelForCausalLM

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    model = AutoModelForCausalLM.from_pretrained(reference_dir, device_map="cpu",
                                                 dtype=torch.float32)
    config = BaseQuantizeConfig(nbits=settings["nbits"], group_size=settings["group_size"])
    size = 0
    for name, module in list(model.model.layers.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                layer = HQQLinear(child, config, compute_dtype=torch.float32, device="cpu")
                setattr(module, child_name, layer)
                meta = layer.meta
                size += layer.W_q.numel() * layer.W_q.element_size()
                size += 2 * (meta["scale"].numel() + meta["zero"].numel())
    quantized = {id(p) for m in model.modules() if isinstance(m, HQQLinear) for p in m.parameters()}
    size += 2 * sum(p.numel() for p in model.parameters() if id(p) not in quantized)
    return model, size


def load(variant: Variant, folder: Path, tokenizer_dir: Path) -> tuple[Any, str]:
    """The reloaded variant behind `LoadedExport`'s interface, and which loader opened it.

    GPTQ rows with an 8-bit `dynamic` override or a quantized lm_head are scored through
    gptqmodel's own loader: transformers loads GPTQ through optimum, which has neither
    (whether it can is recorded in the loader string).
    """
    import torch

    from toolkit.runtime.loading import load_export

    if variant.family == "bnb":
        fmt = "bnb-int8" if variant.overrides["bits"] == 8 else "bnb-nf4"
        return load_export(folder, fmt=fmt, device="cpu", tokenizer_dir=tokenizer_dir), \
            "transformers"
    if not {"dynamic", "lm_head"} & {k for k, v in variant.overrides.items() if v}:
        return load_export(folder, fmt="gptq-int4", device="cpu",
                           tokenizer_dir=tokenizer_dir), "transformers"
    try:
        load_export(folder, fmt="gptq-int4", device="cpu", tokenizer_dir=tokenizer_dir)
        verdict = "transformers loads it too"
    except Exception as exc:  # noqa: BLE001 (recorded: whether transformers can load it)
        verdict = f"transformers fails: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    from gptqmodel import BACKEND, GPTQModel

    # the fused CPU kernel is 4-bit only: 8-bit layers need the plain torch one, which
    # computes in fp16/bf16 only
    model = GPTQModel.load(str(folder), device="cpu", dtype=torch.bfloat16,
                           backend=BACKEND.TORCH).model
    return _wrap(model, tokenizer_dir), f"gptqmodel ({verdict})"


def _wrap(model: Any, tokenizer_dir: Path) -> Any:
    """A transformers model as a `LoadedExport` (scoring and greedy decoding)."""
    from toolkit.evaluation import torch_logits_fn
    from toolkit.runtime.facts import eos_token_ids, pad_token_id
    from toolkit.runtime.loading import LoadedExport, _stepwise, load_tokenizer
    from toolkit.runtime.torch_steps import TorchStepBackend

    model.eval()
    tokenizer = load_tokenizer(tokenizer_dir)
    eos = eos_token_ids(tokenizer, model.generation_config)
    return LoadedExport(tokenizer_dir, "merged", "transformers", tokenizer, None,  # type: ignore[arg-type]
                        torch_logits_fn(model), eos, model,
                        _stepwise(TorchStepBackend(model, pad_token_id(tokenizer)), eos))


def timed_ratio(bench: Bench, loaded: Any) -> tuple[float, float]:
    """(variant tok/s, variant / merged speed), best of rounds of merged, variant, variant,
    merged: interleaving spreads other jobs' load over both."""
    def rate(model: Any) -> float:
        start = time.perf_counter()
        produced = len(model.generate(bench.speed_prompt, bench.new_tokens, stop_at_eos=False))
        return produced / (time.perf_counter() - start)

    loaded.generate(bench.speed_prompt, 2)
    bench.reference.generate(bench.speed_prompt, 2)
    ours = theirs = 0.0
    for _ in range(bench.rounds):
        theirs = max(theirs, rate(bench.reference))
        ours = max(ours, rate(loaded), rate(loaded))
        theirs = max(theirs, rate(bench.reference))
    return ours, ours / theirs


def measure(bench: Bench, variant: Variant, work: Path) -> dict[str, Any]:
    """Quantize, reload, score and time one variant; its table row."""
    from toolkit.evaluation import perplexity
    from toolkit.export.gptq import quantized_kernels
    from toolkit.export.quality import folder_sizes, ppl_summary
    from toolkit.export.report import delta_pct

    folder = work / "".join(c if c.isalnum() else "-" for c in variant.name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    if variant.family == "hqq":
        settings = dict(variant.overrides)
        model, weights = quantize_hqq(bench.reference_dir, settings)
        loaded, loader = _wrap(model, bench.reference_dir), "hqq HQQLinear (in memory)"
        seconds = time.perf_counter() - started
    else:
        settings = quantize(bench, variant, folder)
        seconds = time.perf_counter() - started
        loaded, loader = load(variant, folder, bench.reference_dir)
        weights = folder_sizes(folder)[1]
    ppl = ppl_summary(perplexity(loaded.logits_fn, bench.encoded))
    tps, ratio = timed_ratio(bench, loaded)
    row = {
        "variant": variant.name, "family": variant.family, "note": variant.note,
        "settings": {k: v for k, v in settings.items()
                     if k not in ("reason", "measured", "lm_head_note")},
        "weights_bytes": weights, "size_ratio": weights / bench.fp16_bytes,
        "perplexity": {k: ppl[k] for k in ("overall", "fr", "en")},
        "delta_pct": {k: delta_pct(ppl[k], bench.reference_ppl[k]) for k in ("overall", "fr", "en")},
        "tokens_per_s": tps, "speed_vs_merged": ratio, "quantize_s": seconds,
        "kernels": quantized_kernels(loaded.model), "loader": loader, "status": "ok",
    }
    del loaded
    gc.collect()
    shutil.rmtree(folder, ignore_errors=True)
    return row


def print_table(rows: list[dict[str, Any]], reference_ppl: dict[str, Any] | None) -> None:
    """The markdown table of `rows` (also what the README block renders)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from results import render_quant_methods

    print(render_quant_methods({"rows": rows, "settings": {"reference_perplexity": reference_ppl,
                                                           "threads": "-", "run": "-"}}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "demo",
                        help="training run whose exports/merged is the reference")
    parser.add_argument("--eval", type=Path, default=REPO / "data" / "test.jsonl")
    parser.add_argument("--calibration", type=Path, default=REPO / "data" / "train.jsonl")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "quant-methods")
    parser.add_argument("--only", nargs="*", help="variants named exactly so, or whose names "
                        "contain any of these")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--save", action="store_true",
                        help="write benchmarks/results/quant_methods.json from WORK/rows.jsonl")
    parser.add_argument("--note", default="", help="a sentence saved with the results")
    parser.add_argument("--result", default="quant_methods",
                        help="saved as benchmarks/results/RESULT.json (one per reference model)")
    parser.add_argument("--tabulate", action="store_true",
                        help="measure nothing: print (and --save) the rows already in WORK")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "rows.jsonl"
    done = {}
    if log.is_file():
        done = {r["variant"]: r for r in map(json.loads, log.read_text().splitlines())}
    for row in done.values():  # rows of older runs carried the report-only keys
        for key in ("measured", "lm_head_note"):
            row.get("settings", {}).pop(key, None)
    names = {v.name for v in variants()}
    todo = [v for v in variants() if v.name not in done and not args.tabulate
            and (not args.only or any(s == v.name if s in names else s in v.name
                                      for s in args.only))]
    bench = setup(args) if todo else None
    for variant in todo:
        print(f"--- {variant.name}", flush=True)
        try:
            row = measure(bench, variant, args.work)
        except ImportError as exc:  # HQQ without the hqq package
            row = {"variant": variant.name, "family": variant.family, "status": "skipped",
                   "reason": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # noqa: BLE001 (a failing method is a result, not a crash)
            row = {"variant": variant.name, "family": variant.family, "status": "failed",
                   "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        print(json.dumps(row), flush=True)
        with log.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        done[variant.name] = row
    order = [v.name for v in variants()]
    rows = sorted(done.values(), key=lambda r: order.index(r["variant"])
                  if r["variant"] in order else len(order))
    # the reference scores cached by `setup` (a --save without new rows loads no model)
    cached = json.loads((args.work / "reference.json").read_text())
    reference_ppl = {k: cached["perplexity"][k] for k in ("overall", "fr", "en")}
    print_table(rows, reference_ppl)
    if args.save:
        from results import save

        from toolkit.data.schema import load_examples
        from toolkit.export.calibration import describe_data

        calibration = describe_data(args.calibration, load_examples(args.calibration))
        save(args.result, {
            "run": str(args.run), "reference": cached["reference"],
            "reference_perplexity": reference_ppl, "eval": str(args.eval),
            "calibration": str(args.calibration), "calibration_examples": calibration["examples"],
            "calibration_by_language": calibration["by_language"],
            "threads": args.threads, "new_tokens": args.new_tokens, "rounds": args.rounds,
            "note": args.note,
            "shared_cores": "yes: other jobs ran on the same 2 cores; speed is a ratio to the "
                            "merged model timed in interleaved rounds"}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
