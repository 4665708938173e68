"""`gptq-int4`: GPTQ 4-bit through gptqmodel, calibrated on the project's FR/EN examples.

Group size: 32 where it divides every quantized layer's input size, else the largest power
of two that does (by measurement: `benchmarks/quant_methods.py`, `GPTQ_REASON`); weights
symmetric, the one GPTQ layout vLLM's `gptq` loader takes. The group must divide the input sizes:
gptqmodel quantizes SmolLM2 (hidden 576) at g128 without complaint, and its CPU kernel then
fails at inference ("expect K to be divisible by qGroupSize, got K:576, qGroupSize:128").
The checkpoint is saved in
the GPTQ v1 layout vLLM loads (`quantize_config.json` + `config.json` quantization_config:
bits, group_size, desc_act, sym, checkpoint_format "gptq"), non-quantized tensors in the
merged dtype.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.export.context import ExportContext, VariantResult

PREFERRED_GROUP_SIZE = 32
MIN_GROUP_SIZE = 16
#: 2-core machines: more workers only contend (STACK-FACTS); the user's setting wins
DEFAULT_CPU_WORKERS = "2"


def choose_group_size(in_features: Iterable[int],
                      preferred: int = PREFERRED_GROUP_SIZE) -> tuple[int, str]:
    """The GPTQ group size for layers with these input sizes, and why.

    Returns:
        (group size, reason); -1 (one group per output channel) when no power of two from
        `preferred` down to 16 divides them all.
    """
    sizes = sorted({int(k) for k in in_features})
    if not sizes:
        raise ToolkitError("gptq-int4: the model has no linear layers to quantize")
    group = preferred
    while group >= MIN_GROUP_SIZE:
        if all(k % group == 0 for k in sizes):
            if group == preferred:
                return group, f"{group} divides every layer input size ({', '.join(map(str, sizes))})"
            bad = [k for k in sizes if k % preferred]
            return group, (f"{preferred} does not divide input size(s) {', '.join(map(str, bad))} "
                           f"(the CPU kernel needs it to); {group} is the largest power of two "
                           "that divides them all")
        group //= 2
    return -1, (f"no power of two >= {MIN_GROUP_SIZE} divides every input size "
                f"({', '.join(map(str, sizes))}); one group per output channel")


def quantized_in_features(model_dir: Path, trust_remote_code: bool = False) -> dict[str, int]:
    """Input size of every linear layer GPTQ quantizes (the decoder's; not lm_head), read
    from the config on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    output = skeleton.get_output_embeddings()
    return {name: int(module.in_features) for name, module in skeleton.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not output}


def gptq_settings(model_dir: Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """The GPTQ settings this exporter uses for `model_dir` (tests and the report read them)."""
    group, why = choose_group_size(quantized_in_features(model_dir, trust_remote_code).values())
    return {"method": "gptq", "bits": 4, "group_size": group, "group_size_reason": why,
            "desc_act": False, "act_group_aware": True, "true_sequential": True,
            "damp_percent": 0.05, "mse": 2.4, "lm_head": False, "sym": True,
            "checkpoint_format": "gptq", "reason": GPTQ_REASON, "lm_head_note": LM_HEAD_NOTE}


GPTQ_REASON = (
    "Symmetric groups of 32, each group's range shrunk to the grid point with the least "
    "|error|^2.4 (gptqmodel mse 2.4: the clipping search of the GPTQ reference code). Measured "
    "on the demo fine-tune of SmolLM2-135M (2 AVX2 cores), whole exports: with the search "
    "+11.7 % perplexity (fr +13.5, en +8.0) against +15.9 % without it, in 769-814 s against "
    "1024 s. Earlier (benchmarks/quant_methods.py): g32 symmetric +16.8 % against "
    "+19.2 % for the former default (g64 symmetric); g32 with desc_act +14.9 %; g32 asymmetric "
    "+7.5 % (fr +9.1 %, en +4.3 %), within the 4-bit target, but vLLM's GPTQ loader takes "
    "symmetric checkpoints only (vllm 0.32 AutoGPTQConfig: 'Unsupported quantization config: "
    "bits=4, sym=False'), and gptq-int4 is the GPTQ checkpoint vLLM serves unchanged. The "
    "asymmetric 4-bit for vLLM is ct-w4a16 (compressed-tensors with zero points). The embedded "
    "SmolLM2 was unpacked from a Q4_1 GGUF, whose blocks of 32 carry a float offset: a zero "
    "point per group follows it, a symmetric grid rounds it a second time. desc_act stays off "
    "(gptqmodel's act-group-aware ordering instead): static groups keep every vLLM backend on "
    "its fast kernel."
)
LM_HEAD_NOTE = (
    "lm_head stays 16-bit: gptqmodel 7.6 refuses to quantize a tied lm_head "
    "(NotImplementedError: tied_weights=True), and untying adds a 4-bit lm_head beside the "
    "16-bit embedding (larger, not smaller); transformers loads GPTQ through optimum, which "
    "converts only the decoder blocks' layers. The tied 49152x576 embedding is 57 of the 269 "
    "fp16 MB, so a 4-bit export of this model cannot go below ~42 % of fp16."
)


#: the keys of a settings dict that are gptqmodel `QuantizeConfig` arguments
QUANTIZE_CONFIG_KEYS = ("bits", "group_size", "desc_act", "act_group_aware", "true_sequential",
                        "damp_percent", "mse", "lm_head", "sym", "dynamic")


def quantize_gptq(model_dir: Path, out: Path, settings: dict[str, Any], texts: list[str], *,
                  dtype: Any, trust_remote_code: bool = False) -> None:
    """Quantize `model_dir` with gptqmodel on `texts` and save a GPTQ v1 checkpoint to `out`.

    The exporter and `benchmarks/quant_methods.py` both call this, so a benchmarked variant is
    exactly what the export would write with those settings.

    Args:
        settings: `gptq_settings`-shaped; the `QUANTIZE_CONFIG_KEYS` present are passed on.
        dtype: torch dtype of the activations during calibration (fp16 or bf16: the GPTQ
            kernels take no fp32).
    """
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    from toolkit.extras import cuda_available
    from toolkit.logs import terminal_to_log

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", DEFAULT_CPU_WORKERS)
    offload = out / ".gptq-offload"
    quant = QuantizeConfig(**{k: settings[k] for k in QUANTIZE_CONFIG_KEYS if k in settings},
                           offload_to_disk_path=str(offload))
    device = "cuda" if cuda_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # gptqmodel prints its banner, config dumps and per-layer bars straight to the terminal
    with terminal_to_log():
        model = GPTQModel.load(str(model_dir), quant, device=device, dtype=dtype,
                               trust_remote_code=trust_remote_code)
        with _quantize_logs_in(out / ".gptq-logs"):
            model.quantize(texts, tokenizer=tokenizer, batch_size=1)
        model.save(str(out))
    shutil.rmtree(offload, ignore_errors=True)
    _drop_scratch_paths(out)
    # gptqmodel saves do_sample=true; every format keeps the merged generation defaults
    if (model_dir / "generation_config.json").is_file():
        shutil.copy2(model_dir / "generation_config.json", out / "generation_config.json")


def export_gptq(ctx: ExportContext, work: Path) -> VariantResult:
    """Quantize the merged folder with gptqmodel on our calibration texts and save it."""
    import torch

    from toolkit.extras import require
    from toolkit.formats import ExportFormat
    from toolkit.runtime.loading import load_export

    require("gptqmodel", "--quantize gptq-int4")
    if ctx.merged_dir is None:
        raise RuntimeError("gptq-int4 starts from the merged folder; export merged first")
    settings = gptq_settings(ctx.merged_dir, ctx.source.trust_remote_code)
    texts, calibration = ctx.calibration()
    ctx.console.print(f"gptq-int4: group size {settings['group_size']} "
                      f"({settings['group_size_reason']}); calibrating on {len(texts)} examples "
                      f"{calibration['by_language']}", highlight=False, markup=False)
    # GPTQ kernels (vLLM's gptq/Marlin, gptqmodel's) take fp16 or bf16 activations, not fp32
    dtype = torch.bfloat16 if ctx.dtype.value == "bf16" else torch.float16
    settings["kernel_dtype"] = str(dtype).removeprefix("torch.")
    ctx.console.print("gptq-int4: quantizing layer by layer (gptqmodel's progress goes to "
                      "export.log; --verbose shows it)", highlight=False, markup=False)
    quantize_gptq(ctx.merged_dir, work, settings, texts, dtype=dtype,
                  trust_remote_code=ctx.source.trust_remote_code)
    settings["gptqmodel"] = _version("gptqmodel")
    settings["cpu_workers"] = os.environ.get("GPTQMODEL_CPU_WORKERS")
    # reloaded here (the runner reuses it) to record the kernel that the measured speed ran
    loaded = load_export(work, fmt=ExportFormat.gptq_int4, tokenizer_dir=ctx.merged_dir)
    settings["inference_kernel"] = ", ".join(quantized_kernels(loaded.model))
    warnings = [calibration["warning"]] if calibration.get("warning") else []
    return VariantResult(quantization=settings, calibration=calibration, warnings=warnings,
                         loaded=loaded)


def quantized_kernels(model: Any) -> list[str]:
    """Class names of the quantized linear layers a loaded model runs.

    For GPTQ this is the kernel gptqmodel selected at load (e.g. `TorchFusedQuantLinear`, the
    int4 CPU matmul of torch, against the dequantize-then-matmul `TorchQuantLinear`): the
    decode speed depends on it more than on anything else, so the report names it.
    """
    return sorted({type(m).__name__ for m in model.modules()
                   if hasattr(m, "qweight") or type(m).__name__ in BNB_HQQ_LINEARS})


#: bitsandbytes' and HQQ's quantized linear classes (they hold no `qweight`)
BNB_HQQ_LINEARS = ("Linear8bitLt", "Linear4bit", "HQQLinear")


@contextmanager
def _quantize_logs_in(folder: Path) -> Iterator[None]:
    """Send gptqmodel's per-layer logs into `folder` (deleted after) instead of `./logs`.

    gptqmodel 7.x writes `logs/gptq_log_*.log` relative to the current directory (its
    module constant `_PROJECT_LOG_DIR`): an export run from a repository would litter it.
    The per-layer losses are kept in `quant_log.csv`, which `model.save` writes.
    """
    from gptqmodel.looper import loop_processor

    saved = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield
    finally:
        if saved is not None:
            loop_processor._PROJECT_LOG_DIR = saved
        shutil.rmtree(folder, ignore_errors=True)


def _drop_scratch_paths(folder: Path) -> None:
    """gptqmodel records its (deleted) offload folder in the saved configs; drop it."""
    import json

    for name in ("quantize_config.json", "config.json"):
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        block = data.get("quantization_config", data) if name == "config.json" else data
        meta = block.get("meta") if isinstance(block, dict) else None
        if isinstance(meta, dict) and meta.pop("offload_to_disk_path", None) is not None:
            path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
