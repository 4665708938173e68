"""What an export starts from: a training run (manifest + adapter) or a bare peft adapter.

A run folder carries everything (base model, system prompt, sequence length, held-out data,
whether the base was trained 4-bit); a bare adapter folder carries only its
`base_model_name_or_path`, so the rest falls back to the training defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.artifacts import (
    ADAPTER_CONFIG,
    DEFAULT_MAX_SEQ_LEN,
    RUN_MANIFEST,
    Kind,
    RunManifest,
    identify,
    read_run,
)
from toolkit.errors import ToolkitError
from toolkit.model_source import ResolvedModel

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class ExportSource:
    """A fine-tune pinned to local folders, with the settings export needs from training.

    Attributes:
        path: what the user passed.
        run_dir: the training run, or None for a bare adapter folder.
        adapter_dir: the peft adapter (with the tokenizer and chat template when trained here).
        base: the base model, resolved to a local folder.
        manifest: the run's manifest, or None for a bare adapter.
        system_prompt: rendered before every example, as in training (None: no system turn).
        max_seq_len: longer held-out examples are truncated, as in training.
        qlora: the adapter was trained on a 4-bit NF4 base (merge into the de-quantized base).
        compute_dtype: the dtype the base was loaded in for training (QLoRA: fp16 or bf16).
        trust_remote_code: as the training config allowed.
        eval_path: held-out data recorded by the run (None: not recorded).
        calibration_path: training data recorded by the run (None: not recorded).
    """

    path: Path
    run_dir: Path | None
    adapter_dir: Path
    base: ResolvedModel
    manifest: RunManifest | None = None
    system_prompt: str | None = None
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    qlora: bool = False
    compute_dtype: str = "fp32"
    trust_remote_code: bool = False
    eval_path: Path | None = None
    calibration_path: Path | None = None

    @property
    def default_out(self) -> Path:
        """`RUN/exports` (for a bare adapter: `exports` beside the adapter folder)."""
        return (self.run_dir or self.adapter_dir.parent) / "exports"

    def describe(self) -> dict[str, Any]:
        """The source block of an export report."""
        return {
            "path": str(self.path),
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "adapter_dir": str(self.adapter_dir),
            "adapter_sha256": adapter_fingerprint(self.adapter_dir),
            "base_model": {"source": self.base.source, "path": str(self.base.path),
                           "revision": self.base.revision, "kind": self.base.kind},
            "qlora": self.qlora,
            "compute_dtype": self.compute_dtype,
        }


def adapter_fingerprint(adapter_dir: Path) -> str:
    """sha256 of the adapter weights and config: the identity of "the same fine-tune"."""
    import hashlib

    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS):
        path = adapter_dir / name
        if path.is_file():
            digest.update(name.encode())
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def _check_adapter(adapter_dir: Path, label: str) -> dict[str, Any]:
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ToolkitError(
            f"{label}: no {ADAPTER_CONFIG} in {adapter_dir}; pass a training run folder "
            f"({RUN_MANIFEST} + adapter/) or a peft adapter folder"
        )
    if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ToolkitError(f"{label}: {adapter_dir} has no adapter weights "
                           f"({' or '.join(ADAPTER_WEIGHTS)}); did training finish?")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ToolkitError(f"{config_path}: not valid JSON ({exc.msg})") from None


def resolve_source(path: Path | str) -> ExportSource:
    """Pin a run folder or a peft adapter folder to local folders and training settings.

    Raises:
        ToolkitError: neither a run nor an adapter; the base model cannot be resolved
            offline (ModelSourceError says to pass a local folder).
    """
    from toolkit.model_source import resolve_model

    path = Path(path)
    if not path.is_dir():
        raise ToolkitError(f"{path}: no such folder; pass a training run or a peft adapter folder")
    if identify(path) is Kind.run:
        manifest = read_run(path)
        adapter_dir = manifest.adapter_path(path)
        _check_adapter(adapter_dir, str(path))
        resolved = resolve_model(manifest.base_model.source, manifest.base_model.revision)
        return ExportSource(
            path=path, run_dir=path, adapter_dir=adapter_dir, base=resolved, manifest=manifest,
            system_prompt=manifest.system_prompt, max_seq_len=manifest.max_seq_len,
            qlora=manifest.qlora, compute_dtype=manifest.compute_dtype,
            trust_remote_code=manifest.trust_remote_code,
            eval_path=manifest.data_path("eval"), calibration_path=manifest.data_path("train"),
        )
    adapter_config = _check_adapter(path, str(path))
    base_name = adapter_config.get("base_model_name_or_path")
    if not base_name:
        raise ToolkitError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path; "
                           "export from the training run folder instead")
    from toolkit.config import DataSection

    return ExportSource(
        path=path, run_dir=None, adapter_dir=path, base=resolve_model(str(base_name)),
        system_prompt=DataSection().system_prompt,
    )
