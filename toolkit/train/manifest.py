"""What a training run records beside its numbers: data hashes, package versions, the time.

The manifest itself (`RunManifest`, its file name, writer and reader) is the contract with
the next stages and lives in `toolkit.artifacts`; `read_manifest` is its dict view for
callers that print or compare keys. Only the standard library and pydantic are imported.
"""

from __future__ import annotations

import hashlib
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from toolkit.artifacts import ADAPTER_DIR, CHECKPOINT_DIR, MANIFEST_KEYS, read_run

__all__ = ["ADAPTER_DIR", "CHECKPOINT_DIR", "MANIFEST_KEYS", "package_versions", "read_manifest",
           "sha256_file", "utc_now"]


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


def read_manifest(run_dir: Path | str) -> dict[str, Any]:
    """A run's manifest as a dict (`artifacts.read_run`, same one-line errors)."""
    return read_run(run_dir).model_dump(mode="json")
