"""`runs/NAME/manifest.json`: what a training run was, and what export needs to rebuild it.

Export reads it with `read_manifest(run_dir)` and finds the base model with
`resolve_model(m["base_model"]["source"], m["base_model"]["revision"])`; nothing else is
needed. Only the standard library is imported here, so reading a manifest is instant.

Schema (version 1; every key is always present, `null` where it does not apply):

    manifest_version   1
    toolkit_version    str
    created            UTC ISO 8601 of the run's end
    config             the resolved TrainConfig (config_to_dict)
    base_model         {source, path, revision, kind}            (model_source.ResolvedModel)
    adapter_dir        "adapter" (peft adapter + tokenizer with its chat template)
    checkpoint_dir     "checkpoints" (what --resume continues from)
    chat_template_added  bool: the base had no chat template; toolkit's ChatML one was saved
    data               {train: {path, sha256, examples, tokens, truncated, dropped},
                        eval: {...} | null}
    versions           {toolkit, torch, transformers, peft, accelerate, python}
    device             {type: cpu|cuda, name, precision, requested_precision, quantization,
                        threads, world_size, micro_batch_rows, accumulation_steps}
    world_size         int (processes that trained)
    packing            bool
    metrics            {before: Perplexity.to_dict() | null,
                        epochs: [{epoch, step, train_loss, eval: Perplexity dict | null,
                                  train_tokens, train_time_s (whole run up to this epoch)}],
                        after: Perplexity dict | null}
    truncated_examples int (train + eval examples cut at max_seq_len)
    steps              optimizer steps done (cumulative over resumes)
    resumed_from_step  int | null
    train_tokens       non-pad tokens trained by the whole run (all processes, every
                       invocation up to its last checkpoint: work redone after a resume
                       counts once)
    (data.*.truncated counts each split; truncated_examples is train + eval)
    wall_time_s        this invocation, start to end (model load and evaluations included)
    train_time_s       the training loop only, whole run (same accounting as train_tokens)
    tokens_per_s       train_tokens / train_time_s

`--resume` of a finished run with nothing left to train (same epochs/max_steps) changes
nothing: the run and this manifest stay as they are.
    peak_memory_bytes  ru_maxrss (CPU, max over processes) or torch.cuda.max_memory_allocated
    trainable_params, total_params
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"

#: every key a manifest has (tests and readers check against this)
MANIFEST_KEYS: tuple[str, ...] = (
    "manifest_version", "toolkit_version", "created", "config", "base_model", "adapter_dir",
    "checkpoint_dir", "chat_template_added", "data", "versions", "device", "world_size",
    "packing", "metrics", "truncated_examples", "steps", "resumed_from_step", "train_tokens",
    "wall_time_s", "train_time_s", "tokens_per_s", "peak_memory_bytes", "trainable_params",
    "total_params",
)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


TRAIN_PACKAGES = ("toolkit", "torch", "transformers", "peft", "accelerate")


def package_versions(names: tuple[str, ...] = TRAIN_PACKAGES) -> dict[str, str | None]:
    """Versions of the packages that determine what a run (or an export) produced."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def utc_now() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest.json` atomically (temp file, then rename)."""
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"manifest lacks {missing}")
    path = run_dir / MANIFEST_NAME
    tmp = run_dir / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_manifest(run_dir: Path | str) -> dict[str, Any]:
    """Read a training run's manifest.

    Raises:
        ToolkitError: no manifest in the folder (not a finished training run), or not JSON.
    """
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ToolkitError(
            f"{run_dir}: no {MANIFEST_NAME}; pass the folder of a finished `toolkit train` run"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ToolkitError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict) or "base_model" not in data:
        raise ToolkitError(f"{path}: not a toolkit training manifest (no base_model)")
    return data
