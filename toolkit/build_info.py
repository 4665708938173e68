"""Which toolkit build is running: its version and git commit, for `toolkit_build_info`.

The commit comes from `TOOLKIT_COMMIT` (the Dockerfile's build argument: an image has no `.git`),
else from git when the package runs from a checkout, else "unknown". Only a hex hash is
accepted, so the metric label stays bounded whatever the environment holds.
"""

from __future__ import annotations

import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

COMMIT_ENV = "TOOLKIT_COMMIT"
UNKNOWN = "unknown"
_HASH = re.compile(r"^[0-9a-f]{7,40}$")


def toolkit_version() -> str:
    """The installed toolkit's version."""
    from toolkit import __version__

    return __version__


@lru_cache(maxsize=1)
def build_commit() -> str:
    """The short commit of this build, or "unknown" (see the module docstring)."""
    value = os.environ.get(COMMIT_ENV, "").strip().lower()
    if not value:
        value = _git_commit(Path(__file__).resolve().parent.parent)
    return value[:12] if _HASH.match(value) else UNKNOWN


def _git_commit(checkout: Path) -> str:
    if not (checkout / ".git").exists():
        return UNKNOWN
    try:
        result = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):  # no git binary, or a hung filesystem
        return UNKNOWN
    return result.stdout.strip() if result.returncode == 0 else UNKNOWN
