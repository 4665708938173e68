"""`merged`: fold the LoRA adapters into the base weights, checked against the adapter.

The merge runs in fp32 and is verified before anything is saved: merged logits must equal
the adapter-applied model's on held-out prompts (max |diff| ~1e-5 of the logit scale; a
wrong merge is ~1e-2). The weights are then saved in the asked dtype, and the reload check
compares the saved folder with the in-memory weights rounded to that dtype, so a broken
save is caught apart from the (reported) cost of rounding.

An adapter trained QLoRA learned its correction on top of the NF4-rounded base, not the
original weights: it is merged into the base quantized to NF4 exactly as training loaded
it (double quantization, compute dtype) and de-quantized back.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.export.context import ExportContext, VariantResult
from toolkit.export.quality import logit_scale
from toolkit.export.quality import max_abs_diff as max_diff
from toolkit.export.source import ExportSource
from toolkit.formats import dtype_name

#: max |logit diff| / max(1, max |logit|): merged (fp32, in memory) vs adapter-applied
MERGE_REL_TOL = 1e-4
#: the saved folder reloaded vs the in-memory merged weights rounded to the saved dtype
RELOAD_REL_TOL = 1e-4


class ExportVerificationError(ToolkitError):
    """An export does not match its reference; nothing was written."""


def prompt_logits(model: Any, prompts: list[list[int]]) -> list[np.ndarray]:
    """Logits of a PyTorch model on each prompt, as float32 numpy arrays."""
    from toolkit.evaluation import torch_logits_fn

    fn = torch_logits_fn(model)
    return [np.asarray(fn(np.asarray([p], dtype=np.int64)), dtype=np.float32) for p in prompts]


def load_base_fp32(source: ExportSource) -> Any:
    """The base model in fp32, de-quantized from NF4 when the adapter was trained QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    trust = source.trust_remote_code
    if not source.qlora:
        return AutoModelForCausalLM.from_pretrained(source.base.path, dtype=torch.float32,
                                                    trust_remote_code=trust)
    from toolkit.extras import require

    require("bitsandbytes", "merging a QLoRA (nf4) adapter")
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, dtype_name(source.compute_dtype) or "bfloat16", torch.bfloat16)
    if compute is torch.float32:  # QLoRA trains in fp16/bf16 (config rule); bf16 if unknown
        compute = torch.bfloat16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(
        source.base.path, dtype=compute, quantization_config=quant, device_map="cpu",
        trust_remote_code=trust)
    model = model.dequantize()
    return model.float()


def merge_adapter(source: ExportSource, prompts: list[list[int]]) -> tuple[Any, dict[str, Any]]:
    """Apply the adapter, score the prompts, merge, score again: the merged fp32 model and
    the check {merge_max_abs_logit_diff, tolerance, adapter_logits}.

    Raises:
        ExportVerificationError: merged logits differ from the adapter-applied ones.
    """
    from peft import PeftModel

    base = load_base_fp32(source)
    model = PeftModel.from_pretrained(base, source.adapter_dir)
    model.eval()
    adapter_logits = prompt_logits(model, prompts)
    merged = model.merge_and_unload(progressbar=True)
    merged.eval()
    merged_logits = prompt_logits(merged, prompts)
    diff = max_diff(adapter_logits, merged_logits)
    tolerance = MERGE_REL_TOL * logit_scale(adapter_logits)
    if not diff <= tolerance:
        raise ExportVerificationError(
            f"merged: merged logits differ from the adapter-applied model by {diff:.3g} "
            f"(tolerance {tolerance:.3g}) on {len(prompts)} held-out prompts; the adapter does "
            "not merge cleanly into this base (is it the base it was trained on?)"
        )
    return merged, {"merge_max_abs_logit_diff": diff, "tolerance": tolerance,
                    "adapter_logits": adapter_logits}


def export_merged(ctx: ExportContext, work: Path) -> VariantResult:
    """Merge, verify in memory, save in `ctx.dtype` with tokenizer, template and
    generation config."""
    import torch
    from transformers import AutoTokenizer

    from toolkit.data.prompts import ensure_chat_template
    from toolkit.export.compat import add_v4_compat, copy_support_files

    source = ctx.source
    tokenizer = AutoTokenizer.from_pretrained(source.adapter_dir if (
        source.adapter_dir / "tokenizer_config.json").is_file() else source.base.path)
    template_added = ensure_chat_template(tokenizer)
    merged, check = merge_adapter(source, ctx.verify_prompts)
    vocab = merged.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ToolkitError(f"merged: the tokenizer has {len(tokenizer)} tokens but the model "
                           f"embeds {vocab}; export from the run's own adapter folder")
    adapter_logits = check.pop("adapter_logits")
    dtype = getattr(torch, ctx.dtype.torch_name)
    # Round the weights only: buffers such as rope's inv_freq are recomputed in fp32 on
    # reload, and rounding them too would make the reference differ from any reload.
    with torch.no_grad():
        for param in merged.parameters():
            param.data = param.data.to(dtype).float()
    rounded = prompt_logits(merged, ctx.verify_prompts)
    params = sum(p.numel() for p in merged.parameters())
    merged = merged.to(dtype)
    merged.config.use_cache = True
    merged.save_pretrained(work)
    tokenizer.save_pretrained(work)
    copy_support_files(source.base.path, work)  # generation_config when the base has one
    compat = add_v4_compat(work)
    del merged
    gc.collect()
    dtype_diff = max_diff(adapter_logits, rounded)
    return VariantResult(
        quantization={"method": "none", "bits": None, "weights_dtype": ctx.dtype.torch_name,
                      "qlora_nf4_base": source.qlora, "parameters": params,
                      "adapter": _adapter_summary(source.adapter_dir),
                      "chat_template_added": template_added, "v4_compat": compat},
        verification={
            "reference": "adapter-applied base (fp32" + (", NF4 round trip" if source.qlora else "")
                         + ")",
            "max_abs_logit_diff": check["merge_max_abs_logit_diff"],
            "tolerance": check["tolerance"],
            f"{ctx.dtype.value}_rounding_max_abs_logit_diff": dtype_diff,
        },
        reference_logits=rounded,
        reference_name=f"merged weights in memory, rounded to {ctx.dtype.value}",
        tolerance=RELOAD_REL_TOL * logit_scale(rounded),
    )


def _adapter_summary(adapter_dir: Path) -> dict[str, Any]:
    import json

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    targets = config.get("target_modules")
    return {"r": config.get("r"), "alpha": config.get("lora_alpha"),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets,
            "peft_type": config.get("peft_type")}
