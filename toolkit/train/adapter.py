"""Make the adapter folder a run hands out portable and self-describing.

peft saves `base_model_name_or_path` as the folder the base was loaded from: for an embedded
or hub model, a cache path of the training machine that means nothing elsewhere. It is
replaced by the portable id (`embedded:smollm2-135m`, the hub id), which every loader of
the adapter's base (export, serve, compare) resolves through `toolkit.model_source`. peft's
empty card template is replaced by a real card, and the tokenizer files lose the
leftovers of the load (see `toolkit.tokenizer_files`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit.cards import INTENDED_USE, render_card
from toolkit.model_source import ResolvedModel
from toolkit.runtime.facts import context_length
from toolkit.tokenizer_files import tidy_tokenizer_config

ADAPTER_CONFIG = "adapter_config.json"
CARD_NAME = "README.md"


def finish_adapter(adapter_dir: Path, base: ResolvedModel, manifest: dict[str, Any],
                   run_name: str) -> None:
    """Portable base id, tidy tokenizer files and a model card, written into `adapter_dir`."""
    config_path = adapter_dir / ADAPTER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base.portable
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tidy_tokenizer_config(adapter_dir, context_length(base.path))
    card = adapter_card(base, config, manifest, run_name)
    (adapter_dir / CARD_NAME).write_text(card, encoding="utf-8")


def adapter_card(base: ResolvedModel, adapter_config: dict[str, Any],
                 manifest: dict[str, Any], run_name: str) -> str:
    """The adapter's README.md: what was trained on what, how well, and how to load it."""
    targets = adapter_config.get("target_modules")
    targets_text = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
    rank = adapter_config.get("r")
    body = [
        f"# {run_name} (LoRA adapter)",
        "",
        (f"LoRA adapter (r={rank}, alpha={adapter_config.get('lora_alpha')}, on "
         f"{targets_text}) trained by toolkit {manifest.get('toolkit_version')} on "
         f"`{base.hub_id or base.portable}`; `adapter_config.json` names the base as "
         f"`{base.portable}`."),
        "",
        *INTENDED_USE,
        "",
        *_training_section(manifest),
        "",
        *_load_section(base, rank),
    ]
    return render_card(base, "peft", ["peft", "adapter"], body, base_model_relation="adapter")


def _training_section(manifest: dict[str, Any]) -> list[str]:
    data = manifest.get("data") or {}
    metrics = manifest.get("metrics") or {}
    lines = ["## Training and evaluation", ""]
    for split in ("train", "eval"):
        entry = data.get(split)
        if isinstance(entry, dict):
            lines.append(f"- {split}: `{Path(str(entry.get('path'))).name}`, "
                         f"{entry.get('examples')} examples, sha256 "
                         f"`{str(entry.get('sha256'))[:12]}`")
    device = manifest.get("device") or {}
    lines.append(f"- {manifest.get('steps')} steps on {device.get('type')} "
                 f"({device.get('precision')}), {manifest.get('tokens_per_s')} tokens/s")
    lines += ["", "Held-out perplexity (answers scored, prompts as context):", "",
              "| | overall | fr | en |", "|---|---|---|---|"]
    for label in ("before", "after"):
        ppl = metrics.get(label) or {}
        by_language = ppl.get("by_language") or {}
        lines.append(f"| {label} | {_ppl(ppl.get('overall'))} | {_ppl(by_language.get('fr'))} | "
                     f"{_ppl(by_language.get('en'))} |")
    return lines


def _ppl(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.2f}"


def _load_section(base: ResolvedModel, rank: Any) -> list[str]:
    vllm_base = base.hub_id or base.portable
    return [
        "## How to load",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from toolkit.model_source import resolve_model",
        "",
        f'base = AutoModelForCausalLM.from_pretrained(resolve_model("{base.portable}").path)',
        'model = PeftModel.from_pretrained(base, "adapter")',
        'tokenizer = AutoTokenizer.from_pretrained("adapter")  # with its chat template',
        "```",
        "",
        "```bash",
        (f"vllm serve {vllm_base} --enable-lora --lora-modules finetune=./adapter "
        f"--max-lora-rank {rank}"),
        "toolkit serve RUN_DIR       # or: toolkit export RUN_DIR --quantize gptq-int4",
        "```",
    ]
