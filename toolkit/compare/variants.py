"""Open any variant the user names — a model source, a training run, or an export folder —
through `toolkit.runtime`, so every variant is scored by the code export measures with and
serve loads with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.artifacts import Kind, identify, read_run, trained_system_prompt
from toolkit.evaluation import LogitsFn
from toolkit.runtime.facts import DEFAULT_CONTEXT_LENGTH, context_length


@dataclass
class Variant:
    """A loaded variant: how to score it, how to generate with it, and what it is.

    Attributes:
        system_prompt: the one it was trained with ("" for none), or None when the folder
            records none (a base model): compare then uses its default.
    """

    name: str
    kind: str  # "base" | "run" | "export"
    path: Path
    format: str
    size_bytes: int
    tokenizer: Any
    logits_fn: LogitsFn
    generate: Callable[[list[int], int], list[int]]
    max_len: int
    system_prompt: str | None = None


def folder_size(path: Path, suffixes: tuple[str, ...] = ()) -> int:
    """Bytes of the files under `path` (only those ending in `suffixes`, when given)."""
    return sum(f.stat().st_size for f in path.rglob("*")
               if f.is_file() and (not suffixes or f.name.endswith(suffixes)))


def _variant(name: str, kind: str, path: Path, fmt: str, size: int, loaded: Any,
             max_len: int | None) -> Variant:
    return Variant(
        name=name, kind=kind, path=path, format=fmt, size_bytes=size,
        tokenizer=loaded.tokenizer, logits_fn=loaded.logits_fn, generate=loaded.generate,
        max_len=int(max_len or context_length(loaded.path) or DEFAULT_CONTEXT_LENGTH),
        system_prompt=trained_system_prompt(path),
    )


def _open_run(path: Path) -> Variant:
    from toolkit.model_source import resolve_model
    from toolkit.runtime.loading import load_export

    manifest = read_run(path)
    base_path = resolve_model(manifest.base_model.source, manifest.base_model.revision).path
    adapter = manifest.adapter_path(path)
    loaded = load_export(base_path, adapter=adapter, tokenizer_dir=adapter)
    size = folder_size(base_path, (".safetensors", ".bin")) + folder_size(adapter, (".safetensors",))
    return _variant(path.name, "run", path, "adapter", size, loaded, None)


def _open_export(path: Path) -> Variant:
    from toolkit.runtime.loading import load_export

    loaded = load_export(path)
    report = loaded.report
    name = f"{path.parent.parent.name}/{path.name}" if path.parent.name == "exports" else path.name
    size = report.size_bytes if report is not None else folder_size(path)
    return _variant(name, "export", path, loaded.format.value, size, loaded,
                    report.max_model_len if report is not None else None)


def open_variant(spec: str) -> Variant:
    """Load `spec`: an export folder, a training run, or anything `resolve_model` accepts."""
    path = Path(spec)
    kind = identify(path)
    if kind is Kind.export:
        return _open_export(path)
    if kind is Kind.run:
        return _open_run(path)

    from toolkit.model_source import resolve_model
    from toolkit.runtime.loading import load_export

    resolved = resolve_model(spec)
    name = spec.removeprefix("embedded:") if spec.startswith("embedded:") else resolved.path.name
    loaded = load_export(resolved.path)
    size = folder_size(resolved.path, (".safetensors", ".bin"))
    return _variant(name, "base", resolved.path, "fp32", size, loaded, None)
