"""`run_export`: a run (or adapter) in, one verified folder per format out, and the table.

Order of work: everything a user can get wrong is checked before any weights load: format
names, dtype, the source, the data files, each format's extras and hardware, and the target
folders. A format this machine cannot produce is reported as skipped (with what it needs)
while the others proceed; when none can be produced the command fails up front. `merged` is
always made first (or reused when an earlier export of the same adapter and dtype is there):
it is the reference every other format is measured against and the folder they start from.

Each format is written into a temporary folder, reloaded, verified and measured there, and
renamed into place only when it passed. Exit status through the CLI: 0 every asked format was
produced; 1 some were skipped or failed (the others are done), or nothing was done (user
error, nothing producible here, or the merge failed its check: the one-line error says which).
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from toolkit.artifacts import (
    ExportReport,
    has_export_report,
    package_versions,
    read_export,
    utc_now,
)
from toolkit.atomic import ExportExistsError, atomic_dir, sigterm_as_interrupt
from toolkit.errors import DataError, ToolkitError
from toolkit.export.context import ExportContext, VariantResult
from toolkit.export.registry import (
    REGISTRY,
    ExportFormat,
    MergeDtype,
    get_exporter,
    parse_dtype,
    parse_formats,
    unavailable_reason,
)
from toolkit.export.report import TableRow, delta_pct, print_table, write_report
from toolkit.logs import route_logs
from toolkit.shipped import resolve_user_path

DEFAULT_EVAL = Path("data/test.jsonl")
DEFAULT_CALIBRATION = Path("data/train.jsonl")
#: third-party logging and warnings of the export (`toolkit.logs`), beside the format folders
LOG_FILE = "export.log"
NEEDS_CALIBRATION = (ExportFormat.gptq_int4, ExportFormat.onnx_int8, ExportFormat.onnx_int4,
                     ExportFormat.onnx_w8a8, ExportFormat.ct_w8a8, ExportFormat.ct_w4a16)


class ExportUnavailableError(ToolkitError):
    """None of the asked formats can be produced on this machine (one line per format)."""


@dataclass
class FormatOutcome:
    """What happened to one format: "ok", "reused", "skipped" (before any work) or "failed"."""

    format: ExportFormat
    status: str
    path: Path | None = None
    report: ExportReport | None = None
    reason: str = ""


@dataclass
class ExportResult:
    """Every asked format's outcome, in the order asked."""

    out: Path
    outcomes: list[FormatOutcome] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every asked format was produced (or reused) and verified."""
        return all(o.status in ("ok", "reused") for o in self.outcomes)

    def outcome(self, fmt: ExportFormat | str) -> FormatOutcome:
        """The outcome of one format."""
        fmt = ExportFormat(fmt)
        return next(o for o in self.outcomes if o.format is fmt)


@dataclass
class _Reference:
    """The merged model's numbers every other format is compared with."""

    perplexity: dict[str, Any]
    logits: list[Any]
    fp16_bytes: int


EXPORT_PACKAGES = ("toolkit", "torch", "transformers", "peft", "bitsandbytes", "gptqmodel",
                   "optimum", "onnx", "onnxruntime", "compressed-tensors")


def _resolve_data(path: Path | None, recorded: Path | None, default: Path, what: str) -> Path:
    """The explicit path (which must exist), else the run's recorded one, else the default.

    Relative recorded and default paths (`data/test.jsonl`) are also looked up in the
    installation, so an export started outside the checkout finds the shipped data.
    """
    flag = f"--{what.replace(' ', '-')}"
    if path is not None:
        if not Path(path).is_file():
            raise DataError(f"{path}: no such {what} file ({flag})")
        return Path(path)
    for candidate in (recorded, default):
        if candidate is not None and resolve_user_path(Path(candidate)).is_file():
            return resolve_user_path(Path(candidate))
    tried = " or ".join(str(c) for c in (recorded, default) if c is not None)
    raise DataError(f"no {what} file ({tried} not found); pass {flag} PATH")


def _reusable_merged(target: Path, ctx: ExportContext) -> bool:
    """An existing merged export of the same adapter, base and dtype (a no-op to redo)."""
    from toolkit.artifacts import ArtifactError
    from toolkit.export.source import adapter_fingerprint

    if not has_export_report(target):
        return False
    try:
        report = read_export(target)
    except ArtifactError:
        return False  # an older or damaged report: export again
    if report.format is not ExportFormat.merged:
        return False
    source = report.source
    return (source.get("adapter_sha256") == adapter_fingerprint(ctx.source.adapter_dir)
            and (source.get("base_model") or {}).get("source") == ctx.source.base.source
            and report.dtype == ctx.dtype.torch_name)


def run_export(
    source: Path | str,
    quantize: list[str] | list[ExportFormat],
    *,
    out: Path | None = None,
    calibration: Path | None = None,
    eval_data: Path | None = None,
    dtype: str | MergeDtype = MergeDtype.fp16,
    overwrite: bool = False,
    console: Console | None = None,
    threads: int = 1,
    speed_tokens: int = 32,
    verbose: bool = False,
    vllm_proof: bool = False,
) -> ExportResult:
    """Export a fine-tune to each asked format, verify and measure each, print the table.

    Args:
        source: a training run folder (manifest.json + adapter/) or a peft adapter folder.
        quantize: format names (`ExportFormat` values), in the order to produce them.
        out: parent of the export folders (default RUN/exports), one subfolder per format.
        calibration: GPTQ / ONNX int8 calibration JSONL (our own FR/EN examples; default:
            the run's training data, else data/train.jsonl).
        eval_data: held-out JSONL for perplexity (default: the run's eval data, else
            data/test.jsonl).
        dtype: merged weights dtype (fp32, fp16, bf16).
        overwrite: replace existing export folders (each only once its new version passed).
        threads: torch / ONNX Runtime threads for the speed measurement (pinned: comparable).
        speed_tokens: tokens generated for the speed measurement.
        verbose: also show third-party logging and warnings on the console; they always go
            to OUT/export.log.
        vllm_proof: load every format vLLM may serve in the vLLM venv and generate a few
            tokens (`toolkit.export.vllm_proof`); the report's `vllm` block and
            `engine_hint` then record what happened instead of what vLLM claims to support.

    Returns:
        Every format's outcome; `complete` says whether all were produced.

    Raises:
        ConfigError: unknown format or dtype. DataError: missing/invalid data.
        ExportExistsError: a target exists without `overwrite` (nothing was done).
        ExportUnavailableError: no asked format can be produced here.
        ExportVerificationError: the merge did not match the adapter (nothing was written).
    """
    with route_logs(verbose=verbose) as logs:
        from toolkit.export.source import resolve_source

        console = console or Console()
        formats = parse_formats(quantize)
        merge_dtype = parse_dtype(dtype)
        src = resolve_source(source)
        out = Path(out) if out is not None else src.default_out
        ctx = ExportContext(source=src, dtype=merge_dtype, out=out, calibration_path=None,
                            console=console, vllm_proof=vllm_proof)

        reasons = _availability(formats)
        producible = [f for f in formats if reasons[f] is None]
        if not producible:
            raise ExportUnavailableError("no asked format can be produced on this machine:\n" +
                                         "\n".join(f"  {reasons[f]}" for f in formats))
        merged_target = out / ExportFormat.merged.value
        reuse_merged = (ExportFormat.merged not in producible and merged_target.exists()
                        and _reusable_merged(merged_target, ctx))
        _check_targets(producible, out, overwrite, reuse_merged)

        eval_path = _resolve_data(eval_data, src.eval_path, DEFAULT_EVAL, "eval data")
        if any(f in NEEDS_CALIBRATION for f in producible):
            ctx.calibration_path = _resolve_data(calibration, src.calibration_path,
                                                 DEFAULT_CALIBRATION, "calibration")
            from toolkit.data.schema import load_examples

            load_examples(ctx.calibration_path)  # invalid calibration data fails before any work
        encoded, eval_info, speed_prompt = encode_eval(src, eval_path)
        ctx.verify_prompts = _verify_prompts(encoded)
        logs.attach(out / LOG_FILE)  # after the tokenizer: transformers' handler exists now

        skipped = [f for f in formats if reasons[f]]
        console.print(f"export {src.path} (base {src.base.source}"
                      f"{', QLoRA: merging into the NF4 round trip' if src.qlora else ''}) -> {out}: "
                      f"{', '.join(f.value for f in producible)}", highlight=False, markup=False)
        for fmt in skipped:
            console.print(f"[yellow]skipped[/yellow] {escape(str(reasons[fmt]))}", highlight=False)

        result = ExportResult(out=out)
        outcomes: dict[ExportFormat, FormatOutcome] = {
            f: FormatOutcome(f, "skipped", reason=str(reasons[f])) for f in skipped}
        common: dict[str, Any] = {"encoded": encoded, "eval_info": eval_info,
                                  "speed_prompt": speed_prompt, "threads": threads,
                                  "speed_tokens": speed_tokens, "overwrite": overwrite}
        with sigterm_as_interrupt():
            if reuse_merged:
                outcomes[ExportFormat.merged] = _reuse_merged(ctx, merged_target, **common)
            else:
                # merged failing is fatal: every other format starts from it
                outcomes[ExportFormat.merged] = _produce(ExportFormat.merged, ctx, None, **common)
            reference = ctx.reference
            for fmt in producible:
                if fmt is ExportFormat.merged:
                    continue
                try:
                    outcomes[fmt] = _produce(fmt, ctx, reference, **common)
                except Exception as exc:  # noqa: BLE001 (one format failing leaves the others)
                    message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ToolkitError) \
                        else str(exc)
                    console.print(f"[red]{fmt.value} failed[/red]: {escape(message)}",
                                  highlight=False)
                    outcomes[fmt] = FormatOutcome(fmt, "failed", reason=message)
        result.outcomes = [outcomes[f] for f in formats]
        rows = [TableRow(o.format.value, o.report, o.status, o.reason) for o in result.outcomes]
        if ExportFormat.merged not in formats:
            merged = outcomes[ExportFormat.merged]
            rows.insert(0, TableRow("merged (reference)", merged.report, merged.status))
        print_table(rows, console, title=f"export of {src.path} (eval: {eval_path}, "
                                         f"{eval_info['examples']} examples)")
        return result


def _availability(formats: list[ExportFormat]) -> dict[ExportFormat, str | None]:
    from toolkit.extras import cuda_available

    cuda = cuda_available()
    return {f: unavailable_reason(f, cuda=cuda) for f in formats}


def _check_targets(formats: list[ExportFormat], out: Path, overwrite: bool,
                   reuse_merged: bool) -> None:
    """Refuse existing folders (all named in one message) before any work."""
    if overwrite:
        return
    needed = list(formats)
    if ExportFormat.merged not in needed and not reuse_merged:
        needed.insert(0, ExportFormat.merged)
    existing = [out / f.value for f in needed if (out / f.value).exists()]
    if existing:
        raise ExportExistsError(
            f"{', '.join(str(p) for p in existing)} already exist(s); pass --overwrite to "
            "replace (the old folders stay untouched until the new ones are verified)"
        )


def encode_eval(src: Any, eval_path: Path) -> tuple[list[Any], dict[str, Any], list[int]]:
    """The held-out examples encoded as in training (system prompt, max length), their
    description, and the speed prompt (the first example's prompt): what every format of an
    export, and `benchmarks/quant_methods.py`, is scored on."""
    from transformers import AutoTokenizer

    from toolkit.data.prompts import encode_examples, ensure_chat_template
    from toolkit.data.schema import load_examples
    from toolkit.export.calibration import describe_data

    examples = load_examples(eval_path)
    tok_dir = src.adapter_dir if (src.adapter_dir / "tokenizer_config.json").is_file() \
        else src.base.path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    ensure_chat_template(tokenizer)
    encoded = encode_examples(tokenizer, examples, src.system_prompt, src.max_seq_len)
    first = encoded[0]
    return encoded, describe_data(eval_path, examples), list(first.input_ids[:first.prompt_len])


def _verify_prompts(encoded: list[Any]) -> list[list[int]]:
    from toolkit.export.quality import pick_verify_prompts

    return pick_verify_prompts(encoded)


def _produce(fmt: ExportFormat, ctx: ExportContext, reference: _Reference | None, *,
             encoded: list[Any], eval_info: dict[str, Any], speed_prompt: list[int],
             threads: int, speed_tokens: int, overwrite: bool) -> FormatOutcome:
    """Export one format into a temporary folder, verify and measure it, commit it."""
    from toolkit.export.compat import add_v4_compat, copy_support_files
    from toolkit.runtime.facts import context_length
    from toolkit.runtime.loading import load_export
    from toolkit.tokenizer_files import tidy_tokenizer_config

    spec = REGISTRY[fmt]
    target = ctx.out / fmt.value
    ctx.console.rule(f"{fmt.value}: {spec.summary}")
    started = time.perf_counter()
    with atomic_dir(target, overwrite=overwrite) as work:
        variant: VariantResult = get_exporter(fmt)(ctx, work)
        if ctx.merged_dir is not None:
            copy_support_files(ctx.merged_dir, work)
            if spec.family == "onnx" and not (work / "config.json").exists():
                shutil.copy2(ctx.merged_dir / "config.json", work / "config.json")
        if spec.family == "transformers":
            add_v4_compat(work)
        tidy_tokenizer_config(work, context_length(work))
        loaded = variant.loaded or load_export(work, fmt=fmt, threads=threads)
        report = _verify_and_report(fmt, ctx, reference, variant, loaded, target, work,
                                    encoded, eval_info, speed_prompt, threads, speed_tokens,
                                    started)
        del loaded, variant
        gc.collect()
    ctx.produced[fmt] = target
    if fmt is ExportFormat.merged:
        ctx.merged_dir = target
    return FormatOutcome(fmt, "ok", target, report)


def _verify_and_report(fmt: ExportFormat, ctx: ExportContext, reference: _Reference | None,
                       variant: VariantResult, loaded: Any, target: Path, work: Path,
                       encoded: list[Any], eval_info: dict[str, Any], speed_prompt: list[int],
                       threads: int, speed_tokens: int, started: float) -> ExportReport:
    from toolkit.export.merge import ExportVerificationError
    from toolkit.export.quality import (
        folder_sizes,
        logit_scale,
        logits_on,
        measure,
        parameter_count,
        ppl_summary,
        verdict,
    )
    from toolkit.export.vllm_compat import engine_hint, vllm_support
    from toolkit.runtime.facts import context_length

    spec = REGISTRY[fmt]
    is_merged = fmt is ExportFormat.merged
    ref_logits = variant.reference_logits
    ref_name = variant.reference_name
    tolerance = variant.tolerance
    if ref_logits is None and reference is not None:
        ref_logits, ref_name = reference.logits, ref_name or "merged model (PyTorch, fp32 compute)"
        if fmt is ExportFormat.onnx:
            from toolkit.export.onnx_formats import ONNX_REL_TOL

            tolerance = ONNX_REL_TOL * logit_scale(ref_logits)
    measured = measure(loaded, encoded, speed_prompt, ctx.verify_prompts, ref_logits,
                       threads=threads, speed_tokens=speed_tokens)
    ppl = ppl_summary(measured.perplexity)
    if is_merged:
        fp16_bytes = parameter_count(work) * 2
        ctx.reference = _Reference(ppl, logits_on(loaded.logits_fn, ctx.verify_prompts),
                                   fp16_bytes)
        reference = ctx.reference
    if reference is None:
        raise RuntimeError("the merged reference must be measured before other formats")
    ref_ppl = reference.perplexity
    deltas = {k: delta_pct(ppl.get(k), ref_ppl.get(k)) for k in ("overall", "fr", "en")}
    quality = verdict(deltas["overall"], spec.target_delta_pct, is_merged)

    checks: list[str] = []
    verification: dict[str, Any] = {"reference": ref_name, "prompts": len(ctx.verify_prompts)}
    verification.update(variant.verification)
    key = "reload_max_abs_logit_diff" if "max_abs_logit_diff" in verification \
        else "max_abs_logit_diff"
    verification[key] = measured.max_abs_logit_diff
    if key == "reload_max_abs_logit_diff":
        verification["reload_tolerance"] = tolerance
    else:
        verification["tolerance"] = tolerance
    if tolerance is not None and measured.max_abs_logit_diff is not None \
            and not measured.max_abs_logit_diff <= tolerance:
        checks.append(f"logits differ from the {ref_name} by {measured.max_abs_logit_diff:.3g} "
                      f"(tolerance {tolerance:.3g})")
    if not measured.generate_ok:
        checks.append(f"reload-and-generate failed ({measured.error})")
    if quality == "ruined":
        checks.append(f"perplexity {ppl['overall']:.2f} vs the merged {ref_ppl['overall']:.2f} "
                      f"({deltas['overall'] if deltas['overall'] is not None else float('nan'):+.0f} %): "
                      "the quantized model loads and generates but its answers are ruined")
    verification.update({"generate_ok": measured.generate_ok, "sample": measured.sample,
                         "passed": not checks, "checks": checks})
    if checks:
        raise ExportVerificationError(f"{fmt.value}: verification failed: {'; '.join(checks)}")

    warnings = list(variant.warnings)
    if quality == "degraded":
        warnings.append(
            f"perplexity delta {deltas['overall']:+.1f} % exceeds the +{spec.target_delta_pct:g} % "
            f"target for {fmt.value} (fr {_fmt_pct(deltas['fr'])}, en {_fmt_pct(deltas['en'])})")
    versions = package_versions(EXPORT_PACKAGES)
    dtype = _served_dtype(fmt, ctx, work)
    vllm = vllm_support(fmt)
    if ctx.vllm_proof and "vllm" in spec.engines:
        from toolkit.export.vllm_proof import prove_export

        ctx.console.print(f"{fmt.value}: proving vLLM loads it and generates (--vllm-proof)",
                          highlight=False, markup=False)
        vllm = prove_export(work, dtype=dtype, quantization=spec.vllm_quantization,
                            prompt_ids=speed_prompt, threads=threads, static=vllm)
    if vllm["checked"] and not vllm["loadable"]:
        warnings.append(f"vLLM cannot serve this export here: {vllm['reason']}")
    elif vllm.get("warning"):
        warnings.append(f"vLLM: {vllm['warning']}")
    size_bytes, weights_bytes = folder_sizes(work)
    report = ExportReport(
        format=fmt.value, path=str(target), source=ctx.source.describe(), dtype=dtype,
        quantization=variant.quantization, max_model_len=context_length(work),
        system_prompt=ctx.source.system_prompt, size_bytes=size_bytes,
        weights_bytes=weights_bytes, fp16_reference_bytes=reference.fp16_bytes,
        size_ratio=weights_bytes / reference.fp16_bytes if reference.fp16_bytes else float("nan"),
        perplexity=ppl, reference_perplexity={k: ref_ppl.get(k) for k in ("overall", "fr", "en")},
        perplexity_delta_pct=deltas,
        quality={"target_delta_pct": spec.target_delta_pct,
                 "within_target": quality in ("ok", "reference"), "verdict": quality},
        speed={**measured.speed.to_dict(), "engine": loaded.engine},
        verification=verification, vllm=vllm, engine_hint=engine_hint(fmt, vllm),
        eval_data=eval_info, calibration=variant.calibration,
        export_seconds=time.perf_counter() - started, versions=versions,
        warnings=warnings, created=utc_now(), toolkit_version=versions["toolkit"] or "",
    )
    write_report(report, work)
    return report


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f} %"


def _served_dtype(fmt: ExportFormat, ctx: ExportContext, folder: Path) -> str:
    """The activation dtype to serve with: config.json's dtype, else the merged dtype."""
    import json

    config_path = folder / "config.json"
    if REGISTRY[fmt].family == "transformers" and config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        value = config.get("dtype") or config.get("torch_dtype")
        if isinstance(value, str):
            return value
    return "float32" if REGISTRY[fmt].family == "onnx" else ctx.dtype.torch_name


def _reuse_merged(ctx: ExportContext, target: Path, *, encoded: list[Any],
                  eval_info: dict[str, Any], speed_prompt: list[int], threads: int,
                  speed_tokens: int, overwrite: bool) -> FormatOutcome:
    """Take an earlier merged export of the same adapter as the reference (re-scored)."""
    from toolkit.evaluation import perplexity
    from toolkit.export.quality import logits_on, parameter_count, ppl_summary
    from toolkit.runtime.loading import load_export

    ctx.console.rule(f"merged: reusing {target} (same adapter and dtype)")
    loaded = load_export(target, fmt=ExportFormat.merged, threads=threads)
    ppl = ppl_summary(perplexity(loaded.logits_fn, encoded, progress=True))
    ctx.reference = _Reference(ppl, logits_on(loaded.logits_fn, ctx.verify_prompts),
                               parameter_count(target) * 2)
    ctx.merged_dir = target
    ctx.produced[ExportFormat.merged] = target
    report = read_export(target).model_copy(update={"perplexity": ppl})
    del loaded
    gc.collect()
    return FormatOutcome(ExportFormat.merged, "reused", target, report)
