"""The training stage's view of its manifest.

The manifest itself (`RunManifest`, its file name, writer and reader) and the provenance
helpers (package versions, hashes, time) are the contract with the next stages and live in
`toolkit.artifacts`; `read_manifest` is the dict view train's callers print and compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.artifacts import read_run

#: the packages whose versions decide what a training run produced
TRAIN_PACKAGES = ("toolkit", "torch", "transformers", "peft", "accelerate")


def read_manifest(run_dir: Path | str) -> dict[str, Any]:
    """A run's manifest as a dict (`artifacts.read_run`, same one-line errors)."""
    return read_run(run_dir).model_dump(mode="json")
