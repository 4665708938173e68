"""Runs and exports for tests, written through `toolkit.artifacts` like the real stages do.

A test that needs a training run or an export folder without training or exporting builds
the typed `RunManifest` / `ExportReport` here and writes it with `write_run` /
`write_export`, so a schema change breaks these builders (once) instead of letting
hand-written JSON drift from what the stages write.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit import __version__
from toolkit.artifacts import (
    ADAPTER_DIR,
    ExportReport,
    RunManifest,
    package_versions,
    sha256_file,
    utc_now,
    write_export,
    write_run,
)
from toolkit.config import config_from_dict, config_to_dict
from toolkit.formats import REGISTRY, ExportFormat


def save_lora_adapter(base: Path, folder: Path, *, r: int = 8, alpha: int = 16,
                      seed: int = 0, scale: float = 0.5) -> Path:
    """A LoRA adapter on q/v with B drawn at `scale` (so it visibly changes the logits),
    saved with the base's tokenizer, as training leaves `RUN/adapter/`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, task_type="CAUSAL_LM",
                                                  target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def _data_entry(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    rows = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return {"path": str(path), "sha256": sha256_file(path) if path.is_file() else "-",
            "examples": len(rows), "tokens": 0, "truncated": 0, "dropped": []}


def write_run_manifest(run_dir: Path, base: Path, *, data: tuple[Path, Path] | None = None,
                       quantization: str = "none", max_seq_len: int = 256,
                       system_prompt: str | None = None, r: int = 8, alpha: int = 16) -> Path:
    """`run_dir/manifest.json` for a LoRA run of `base`, from a real `TrainConfig`."""
    train, evaluation = data if data is not None else (run_dir / "train.jsonl", None)
    data_section: dict[str, Any] = {"train": str(train), "eval": str(evaluation) if evaluation else None}
    if system_prompt is not None:
        data_section["system_prompt"] = system_prompt
    cfg = config_from_dict({
        "model": {"source": str(base)},
        "lora": {"r": r, "alpha": alpha, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"batch_size": 1, "learning_rate": 1e-3, "epochs": 1,
                     "quantization": quantization, "max_seq_len": max_seq_len,
                     "precision": "bf16" if quantization == "nf4" else "fp32"},
        "data": data_section,
    })
    manifest = RunManifest(
        toolkit_version=__version__, created=utc_now(), config=config_to_dict(cfg),
        base_model={"source": str(base), "path": str(base), "revision": None, "kind": "local"},
        adapter_dir=ADAPTER_DIR, chat_template_added=False,
        data={"train": _data_entry(Path(train)),
              "eval": _data_entry(Path(evaluation)) if evaluation else None},
        versions=package_versions(("toolkit", "torch")), device={"type": "cpu", "precision": "fp32"},
        world_size=1, packing=False, metrics={"before": None, "epochs": [], "after": None},
        truncated_examples=0, steps=0, train_tokens=0, wall_time_s=0.0, train_time_s=0.0,
        tokens_per_s=0.0, peak_memory_bytes=0, trainable_params=0, total_params=0,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_run(run_dir, manifest)


def export_report(folder: Path, fmt: str | ExportFormat, **fields: Any) -> ExportReport:
    """An `ExportReport` for `folder`; `fields` override the neutral defaults."""
    fmt = ExportFormat(fmt)
    spec = REGISTRY[fmt]
    values: dict[str, Any] = {
        "format": fmt, "path": str(folder), "source": {}, "dtype": "float32",
        "quantization": {"method": spec.method, "bits": spec.bits}, "max_model_len": None,
        "system_prompt": None, "size_bytes": 0, "weights_bytes": 0, "fp16_reference_bytes": 0,
        "size_ratio": None, "perplexity": {}, "reference_perplexity": {},
        "perplexity_delta_pct": {}, "quality": {}, "speed": {}, "verification": {},
        "vllm": {"loadable": "vllm" in spec.engines, "quantization": None, "checked": False,
                 "reason": "test report", "version": None, "device": None},
        "engine_hint": list(spec.engines), "eval_data": {}, "calibration": None,
        "export_seconds": 0.0, "versions": {}, "toolkit_version": __version__,
    }
    values.update(fields)
    return ExportReport(**values)


def make_export(root: Path, fmt: str, report: dict[str, Any], template: bool = True) -> Path:
    """`root/FMT/`: a config, a tokenizer config (with a chat template) and the report."""
    folder = root / fmt
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    tok = {"chat_template": "{{ messages }}"} if template else {}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    write_export(folder, export_report(folder, fmt, **report))
    return folder
