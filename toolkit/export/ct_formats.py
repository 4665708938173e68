"""`ct-w8a8` and `ct-w4a16`: compressed-tensors checkpoints made by llmcompressor, which vLLM loads.

llmcompressor is vLLM's own compression library and compressed-tensors the format vLLM reads
natively (`config.json` `quantization_config.quant_method: compressed-tensors`), so
`vllm serve EXPORT` loads these folders as they are. llmcompressor 0.14 pins transformers<=5.17,
compressed-tensors==0.19 and datasets<=5.0.1, so it runs in `.venv-llmcompressor`
(`scripts/setup-llmcompressor-venv.sh`) as a subprocess (`llmcompressor_job.py`), the way the
ONNX exporter runs in `.venv-onnx`. The toolkit's venv only reads the result: transformers with
compressed-tensors decompresses it for the perplexity check (activation quantization included:
the W8A8 model is scored with int8 activations, not as a weight-only model).

Recipes are the ones the vLLM docs give: INT8 W8A8 is SmoothQuant (strength 0.9, measured
against the docs' 0.8 in `W8A8_SETTINGS`) then GPTQ with int8 per-channel weights and dynamic
per-token int8 activations; W4A16 is GPTQ int4 in
asymmetric groups of 32 (a scale and a zero point each: measured against symmetric groups and
groups of 64 in `W4A16_SETTINGS`). Both calibrate on every example of the project's FR/EN
calibration file, rendered with the chat template, and keep lm_head (tied to the embedding) in
16 bits.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.export.context import ExportContext, VariantResult
from toolkit.export.sidecar import LLMCOMPRESSOR
from toolkit.processes import owned_tempdir, run_child

log = logging.getLogger(__name__)

JOB_SCRIPT = Path(__file__).with_name("llmcompressor_job.py")
TEMP_PREFIX = "toolkit-llmcompressor-"
FACTS_PREFIX = "LLMCOMPRESSOR_FACTS "
#: calibration sequence length: the training max (512) covers every example of data/train.jsonl
DEFAULT_MAX_SEQ_LEN = 512
#: dampening of the GPTQ Hessian: llmcompressor's default
DAMPENING_FRAC = 0.01
#: W4A16 weights per scale and zero point (see `W4A16_SETTINGS`)
W4A16_GROUP_SIZE = 32

W8A8_SETTINGS: dict[str, Any] = {
    "method": "compressed-tensors", "scheme": "W8A8", "bits": 8, "algorithm": "smoothquant+gptq",
    "smoothing_strength": 0.9, "weights": "int8, per output channel, symmetric",
    "activations": "int8, per token, dynamic, symmetric", "kept": "lm_head (tied embedding)",
    "reason": "the vLLM docs' INT8 W8A8 recipe (SmoothQuant, then GPTQ) at strength 0.9: "
              "SmoothQuant moves activation outliers into the weights so per-token int8 "
              "activations keep quality; GPTQ rounds the weights; vLLM runs int8 x int8 GEMMs "
              "(CPU: oneDNN; GPU: CUTLASS). Measured on the demo fine-tune: strength 0.9 +1.5 % "
              "perplexity (fr +2.0, en +0.5) against +2.5 % at the docs' 0.8 (onnx-w8a8's "
              "alpha sweep chose 0.9 too)",
}
W4A16_SETTINGS: dict[str, Any] = {
    "method": "compressed-tensors", "scheme": "W4A16", "bits": 4, "algorithm": "gptq",
    "symmetric": False, "actorder": "static",
    "weights": "int4 in groups of 32, asymmetric (a zero point per group)",
    "activations": "16-bit", "kept": "lm_head (tied embedding)",
    "reason": "GPTQ int4 with activation order (static groups, no g_idx); asymmetric groups of "
              "32, measured on the demo fine-tune: +8.0 % perplexity (fr +8.2, en +7.5) against "
              "asymmetric g64 +11.5 %, symmetric g64 +23.3 % and symmetric g32 +25.0 % (the base "
              "weights are a dequantized Q4_1 GGUF: asymmetric blocks of 32, which symmetric "
              "levels cannot follow). vLLM reads the zero points: its CPU kernel (CPUWNA16) "
              "takes uint4 with zero points, Marlin on GPUs too",
}


class LlmcompressorError(ToolkitError):
    """llmcompressor ran and failed; the message carries its last error line."""


def resolve_llmcompressor_python(python: Path | None = None) -> Path:
    """The llmcompressor venv's python (argument, $TOOLKIT_LLMCOMPRESSOR_PYTHON, sibling venv).

    Raises:
        MissingExtraError: no such venv; the message gives the set-up command.
    """
    return LLMCOMPRESSOR.resolve(python, "--quantize ct-w8a8/ct-w4a16")


def w4a16_group_size(model_dir: Path, trust_remote_code: bool = False) -> tuple[int, str]:
    """The W4A16 group size: 32 when it divides every quantized layer's input, else the
    largest power of two that does. Asymmetric groups of 32 scored +8.0 % on the demo against
    +11.5 % at 64 (`W4A16_SETTINGS`); every kernel vLLM has for W4A16 takes 32."""
    from toolkit.export.gptq import choose_group_size, quantized_in_features

    return choose_group_size(quantized_in_features(model_dir, trust_remote_code).values(),
                             preferred=W4A16_GROUP_SIZE)


def save_dtype(ctx: ExportContext) -> str:
    """The dtype of the unquantized tensors and scales: bf16 when merged is bf16, else fp16
    (quantized kernels take 16-bit activations; fp32 would only double the embedding)."""
    return "bfloat16" if ctx.dtype.value == "bf16" else "float16"


def run_llmcompressor(job: dict[str, Any], *, python: Path | None = None) -> dict[str, Any]:
    """Run `llmcompressor_job.py` on `job` in the llmcompressor venv; its facts.

    Args:
        job: model, out, scheme, texts, max_seq_len, threads, save_dtype and the scheme's
            settings (see `llmcompressor_job._recipe`).

    Raises:
        MissingExtraError: no llmcompressor venv. LlmcompressorError: the job failed.
    """
    interpreter = resolve_llmcompressor_python(python)
    with owned_tempdir(TEMP_PREFIX) as scratch:
        job_file = Path(scratch) / "job.json"
        job_file.write_text(json.dumps(job), encoding="utf-8")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": str(job["threads"])}
        # minutes of CPU and GBs of memory: it must not outlive a killed export
        done = run_child([str(interpreter), str(JOB_SCRIPT), str(job_file)], env=env,
                         capture_output=True, text=True)
    output = "\n".join(part.rstrip() for part in (done.stdout, done.stderr) if part.strip())
    if output:
        log.info("llmcompressor (exit %s):\n%s", done.returncode, output)
    facts = [line[len(FACTS_PREFIX):] for line in done.stdout.splitlines()
             if line.startswith(FACTS_PREFIX)]
    if done.returncode == 0 and facts:
        return {**json.loads(facts[-1]), "python": str(interpreter)}
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    raise LlmcompressorError(f"llmcompressor failed (exit {done.returncode}): "
                             f"{lines[-1] if lines else 'no error output'}")


def _export(ctx: ExportContext, work: Path, name: str, settings: dict[str, Any]) -> VariantResult:
    if ctx.merged_dir is None:
        raise RuntimeError(f"{name} starts from the merged folder; export merged first")
    texts, calibration = ctx.calibration()
    settings = {**settings, "dampening_frac": DAMPENING_FRAC,
                "max_seq_len": ctx.source.max_seq_len or DEFAULT_MAX_SEQ_LEN,
                "save_dtype": save_dtype(ctx)}
    if settings["scheme"] == "W4A16":
        settings["group_size"], settings["group_size_reason"] = w4a16_group_size(
            ctx.merged_dir, ctx.source.trust_remote_code)
    ctx.console.print(f"{name}: {settings['algorithm']} {settings['scheme']} with llmcompressor, "
                      f"calibrating on {len(texts)} examples {calibration['by_language']} "
                      "(its output goes to export.log)", highlight=False, markup=False)
    job = {"model": str(ctx.merged_dir), "out": str(work), "texts": texts,
           "scheme": settings["scheme"].lower(), "method": settings["algorithm"],
           "threads": os.cpu_count() or 1, **{k: settings.get(k) for k in (
               "smoothing_strength", "dampening_frac", "group_size", "symmetric", "actorder",
               "max_seq_len", "save_dtype")}}
    facts = run_llmcompressor(job)
    # every format keeps the merged generation defaults
    if (ctx.merged_dir / "generation_config.json").is_file():
        shutil.copy2(ctx.merged_dir / "generation_config.json", work / "generation_config.json")
    warnings = [calibration["warning"]] if calibration.get("warning") else []
    return VariantResult(quantization={**settings, "llmcompressor": facts},
                         calibration=calibration, warnings=warnings)


def export_ct_w8a8(ctx: ExportContext, work: Path) -> VariantResult:
    """SmoothQuant + GPTQ W8A8-int8 compressed-tensors checkpoint (see the module docstring)."""
    return _export(ctx, work, "ct-w8a8", W8A8_SETTINGS)


def export_ct_w4a16(ctx: ExportContext, work: Path) -> VariantResult:
    """GPTQ W4A16 compressed-tensors checkpoint (see the module docstring)."""
    return _export(ctx, work, "ct-w4a16", W4A16_SETTINGS)
