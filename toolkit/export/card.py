"""The model card (`README.md`) of an export folder, built from its `ExportReport`.

The report is the measured truth; the card restates it for people and Hub tooling: front
matter (base model, languages, licence, library, format tags), what the folder is, the
intended use and its limits, the evaluation data and quality table, and how to load it with
the engines that fit the format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit.artifacts import ExportReport
from toolkit.cards import INTENDED_USE, render_card
from toolkit.export.registry import REGISTRY, ExportFormat
from toolkit.export.report import mb, num, signed
from toolkit.model_source import ResolvedModel

#: longer quantization settings (measurement tables) stay in export_report.json
CARD_VALUE_MAX = 200
#: Hub library per format family: how the folder is loaded
LIBRARY = {"transformers": "transformers", "onnx": "onnx"}


def model_card(report: ExportReport) -> str:
    """The README.md of an export folder, with validated front matter."""
    spec = REGISTRY[ExportFormat(report.format)]
    base = _base(report)
    return render_card(base, LIBRARY[spec.family], list(spec.card_tags),
                       _body(report, base, spec.summary, spec.family),
                       base_model_relation="quantized" if spec.bits else "finetune")


def _base(report: ExportReport) -> ResolvedModel:
    info = report.source.get("base_model") or {}
    return ResolvedModel(str(info.get("source") or "unknown"), Path(str(info.get("path") or ".")),
                         info.get("revision"), str(info.get("kind") or "local"))


def _run_name(report: ExportReport) -> str:
    """The run the export came from (its folder name), else the adapter folder's."""
    origin = report.source.get("run_dir") or report.source.get("adapter_dir") or report.path
    return Path(str(origin)).name


def _body(r: ExportReport, base: ResolvedModel, summary: str, family: str) -> list[str]:
    folder = Path(r.path).name
    return [
        f"# {_run_name(r)} ({r.format})",
        "",
        (f"`{r.format}` export of a LoRA fine-tune of `{base.hub_id or base.portable}`: "
         f"{summary}. Exported by toolkit {r.toolkit_version} on {r.created}."),
        "",
        *INTENDED_USE,
        "",
        *_format_section(r),
        "",
        *_quality_section(r),
        "",
        *_load_section(r, folder, family),
        *_system_prompt_section(r),
        *(["", "## Warnings", *[f"- {w}" for w in r.warnings]] if r.warnings else []),
        "",
        "Every measurement, version and setting: `export_report.json`.",
    ]


def _format_section(r: ExportReport) -> list[str]:
    quant = {k: v for k, v in r.quantization.items()
             if k not in ("method", "reason", "files") and v not in (None, {}, [])}
    settings = {k: json.dumps(v, ensure_ascii=False) for k, v in quant.items()}
    settings = {k: v for k, v in settings.items() if len(v) <= CARD_VALUE_MAX}
    reason = f" — {r.quantization['reason']}" if r.quantization.get("reason") else ""
    return [
        "## Format",
        "",
        f"- format: `{r.format}`, quantization: `{r.quantization.get('method')}`{reason}",
        *[f"- {key}: `{text}`" for key, text in settings.items()],
        f"- dtype: `{r.dtype}`, max_model_len: {r.max_model_len}",
        (f"- size: {mb(r.size_bytes)} on disk, weights {mb(r.weights_bytes)} = "
         f"{r.size_ratio:.0%} of the fp16 merged model ({mb(r.fp16_reference_bytes)})"),
    ]


def _quality_section(r: ExportReport) -> list[str]:
    ppl, ref, delta = r.perplexity, r.reference_perplexity, r.perplexity_delta_pct
    data: dict[str, Any] = r.eval_data or {}
    target = r.quality.get("target_delta_pct")
    target_text = f" (target: delta <= +{target:g} %)" if target is not None else ""
    check = r.verification
    return [
        "## Evaluation",
        "",
        (f"Held-out answers of `{Path(str(data.get('path'))).name}` ({data.get('examples')} "
         f"examples, by language {json.dumps(data.get('by_language'), ensure_ascii=False)}, "
         f"sha256 `{str(data.get('sha256'))[:12]}`); prompts are context, answers are scored. "
         "The merged model is the reference."),
        "",
        "| | overall | fr | en |",
        "|---|---|---|---|",
        f"| perplexity | {num(ppl.get('overall'))} | {num(ppl.get('fr'))} | {num(ppl.get('en'))} |",
        f"| reference | {num(ref.get('overall'))} | {num(ref.get('fr'))} | {num(ref.get('en'))} |",
        (f"| delta | {signed(delta.get('overall'))} | {signed(delta.get('fr'))} | "
         f"{signed(delta.get('en'))} |"),
        "",
        f"Verdict: **{r.quality.get('verdict')}**{target_text}.",
        (f"Verification: max |logit difference| {num(check.get('max_abs_logit_diff'), '.3g')} "
         f"against {check.get('reference')} on {check.get('prompts')} held-out prompts; "
         f"passed: {check.get('passed')}."),
        (f"Speed on the exporting machine: {num(r.speed.get('tokens_per_s'), '.1f')} tokens/s "
         f"greedy, batch 1, {r.speed.get('threads')} thread(s), {r.speed.get('engine')}."),
    ]


def _load_section(r: ExportReport, folder: str, family: str) -> list[str]:
    lines = ["## How to load", "",
             (f"Engines that served it on the exporting machine: {', '.join(r.engine_hint) or 'none'}."
             f" vLLM: {r.vllm.get('reason')}."), ""]
    if family == "onnx":
        return [*lines, "```python",
                "from optimum.onnxruntime import ORTModelForCausalLM",
                "from transformers import AutoTokenizer",
                "",
                f'model = ORTModelForCausalLM.from_pretrained("{folder}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
                "```", "", "```bash", f"toolkit serve {folder}", "```"]
    if REGISTRY[r.format].method != "bitsandbytes":  # vLLM has no bnb pre-quantized loader
        flag = f" --quantization {r.vllm['quantization']}" if r.vllm.get("quantization") else ""
        lines += ["```bash",
                  f"vllm serve {folder}{flag} --dtype {r.dtype} --max-model-len {r.max_model_len}",
                  "```", ""]
    return [*lines, "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{folder}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
            "```", "", "```bash", f"toolkit serve {folder}", "```"]


def _system_prompt_section(r: ExportReport) -> list[str]:
    if not r.system_prompt:
        return []
    return ["", ("System prompt used in training (`toolkit serve` renders it before user turns;"
            " other engines need it sent as the first message):"), "", f"> {r.system_prompt}"]
