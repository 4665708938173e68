"""The llmcompressor side of `ct-w8a8` / `ct-w4a16`, run by the interpreter of `.venv-llmcompressor`.

llmcompressor 0.14 pins transformers<=5.17 and compressed-tensors==0.19, so it cannot be
imported by the toolkit's own venv; `toolkit.export.ct_formats` runs this file as a script
(`PYTHON llmcompressor_job.py JOB.json`). It imports only what that venv has (no toolkit), reads
the job (model folder, output folder, scheme, calibration texts already rendered with the chat
template), calibrates, saves the compressed-tensors checkpoint vLLM loads, and prints one JSON
line of facts for the export report.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder would be sys.path[0] and its modules would shadow the packages
# of the same name in the other venv
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import json
import time
from typing import Any


def _recipe(job: dict[str, Any]) -> list[Any]:
    """The modifiers for the scheme: the recipes the vLLM docs give for each."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier

    ignore = ["lm_head"]
    if job["scheme"] == "w8a8":
        # vLLM's INT8 W8A8 recipe: SmoothQuant moves activation outliers into the weights,
        # then GPTQ int8 per-channel weights; activations int8 per token, dynamic.
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=job["smoothing_strength"]),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore,
                             dampening_frac=job["dampening_frac"])]
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=job["symmetric"],
                               strategy="group", group_size=job["group_size"])
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    if job["method"] == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(config_groups={"group_0": scheme}, ignore=ignore)]
    return [GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore,
                         actorder=job["actorder"], dampening_frac=job["dampening_frac"])]


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Calibrate and save; returns the facts for the report."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(job["threads"]))
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    encoded = tokenizer(job["texts"], add_special_tokens=False, truncation=True,
                        max_length=int(job["max_seq_len"]))
    dataset = Dataset.from_dict({"input_ids": encoded["input_ids"],
                                 "attention_mask": encoded["attention_mask"]})
    # calibration runs in fp32 (CPUs have no fast fp16 matmul); saved in the serving dtype
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    oneshot(model=model, dataset=dataset, recipe=_recipe(job),
            max_seq_length=int(job["max_seq_len"]), num_calibration_samples=len(dataset),
            shuffle_calibration_samples=False)
    model.to(getattr(torch, job["save_dtype"]))
    out = Path(job["out"])
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    from importlib import metadata

    return {
        "calibration_tokens": sum(len(ids) for ids in encoded["input_ids"]),
        "calibration_examples": len(dataset),
        "quantize_seconds": round(time.perf_counter() - started, 1),
        "quantization_config": config.get("quantization_config"),
        "versions": {p: metadata.version(p) for p in
                     ("llmcompressor", "compressed-tensors", "transformers", "torch")},
    }


if __name__ == "__main__":
    facts = run(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))
    print("LLMCOMPRESSOR_FACTS " + json.dumps(facts))
