"""Open any variant the user names — a model source, a training run, or an export folder —
behind one small interface, so every variant is scored by the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.artifacts import Kind, identify, read_run
from toolkit.evaluation import LogitsFn


@dataclass
class Variant:
    """A loaded variant: how to score it, how to generate with it, and what it is."""

    name: str
    kind: str  # "base" | "run" | "export"
    path: Path
    format: str
    size_bytes: int
    tokenizer: Any
    logits_fn: LogitsFn
    generate: Callable[[list[int], int], list[int]]
    max_len: int


def folder_size(path: Path, suffixes: tuple[str, ...] = ()) -> int:
    """Bytes of the files under `path` (only those ending in `suffixes`, when given)."""
    return sum(f.stat().st_size for f in path.rglob("*")
               if f.is_file() and (not suffixes or f.name.endswith(suffixes)))


def _torch_generate(model: Any, eos: list[int]) -> Callable[[list[int], int], list[int]]:
    import torch

    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos or None, pad_token_id=eos[0] if eos else None)
        return out[0, len(prompt_ids):].tolist()

    return generate


def _eos_ids(tokenizer: Any, model: Any) -> list[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in ids if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _from_transformers(name: str, kind: str, path: Path, model: Any, tokenizer: Any,
                       size_bytes: int) -> Variant:
    from toolkit.data.prompts import ensure_chat_template
    from toolkit.evaluation import torch_logits_fn

    ensure_chat_template(tokenizer)
    model.eval()
    return Variant(
        name=name, kind=kind, path=path, format="fp32" if kind == "base" else "adapter",
        size_bytes=size_bytes, tokenizer=tokenizer, logits_fn=torch_logits_fn(model),
        generate=_torch_generate(model, _eos_ids(tokenizer, model)),
        max_len=int(getattr(model.config, "max_position_embeddings", 2048)),
    )


def _open_run(path: Path) -> Variant:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.model_source import resolve_model

    manifest = read_run(path)
    base_path = resolve_model(manifest.base_model.source, manifest.base_model.revision).path
    adapter = manifest.adapter_path(path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    size = folder_size(base_path, (".safetensors", ".bin")) + folder_size(adapter, (".safetensors",))
    return _from_transformers(path.name, "run", path, model, tokenizer, size)


def _open_export(path: Path) -> Variant:
    from toolkit.export import load_export
    from toolkit.export.quality import folder_sizes

    loaded = load_export(path)
    report = loaded.report
    return Variant(
        name=f"{path.parent.parent.name}/{path.name}" if path.parent.name == "exports" else path.name,
        kind="export", path=path, format=loaded.format.value,
        size_bytes=report.size_bytes if report is not None else folder_sizes(path)[0],
        tokenizer=loaded.tokenizer, logits_fn=loaded.logits_fn, generate=loaded.generate,
        max_len=int((report.max_model_len if report is not None else None) or 2048),
    )


def open_variant(spec: str) -> Variant:
    """Load `spec`: an export folder, a training run, or anything `resolve_model` accepts."""
    path = Path(spec)
    kind = identify(path)
    if kind is Kind.export:
        return _open_export(path)
    if kind is Kind.run:
        return _open_run(path)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.model_source import resolve_model

    resolved = resolve_model(spec)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    name = spec.removeprefix("embedded:") if spec.startswith("embedded:") else resolved.path.name
    size = folder_size(resolved.path, (".safetensors", ".bin"))
    return _from_transformers(name, "base", resolved.path, model, tokenizer, size)
