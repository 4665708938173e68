"""Verify that the running interpreter's environment holds exactly what its lock files list.

Run with the venv's own python: `VENV/bin/python scripts/check_lock.py locks/main.txt ...`.
Prints one line and exits 1 when a package is missing, has another version, or is not in any
lock (a resolver that swapped the CPU torch for a CUDA build shows up as both). Needs only the
standard library, so it runs in every venv the set-up creates.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import distributions
from pathlib import Path

#: what `python -m venv` seeds and the editable project itself: present but never locked
UNLOCKED = {"pip", "setuptools", "wheel", "toolkit"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s\\;]+)")


def normalize(name: str) -> str:
    """PEP 503 name, so `GPTQModel` in metadata matches `gptqmodel` in a lock."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_locks(paths: list[str]) -> dict[str, str]:
    """`name -> version` of every `name==version` line in the lock files."""
    pins: dict[str, str] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            match = _PIN.match(line)
            if match:
                pins[normalize(match.group(1))] = match.group(2)
    return pins


def differences(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """Human-readable mismatches between the locks and the environment, sorted."""
    problems = []
    for name, version in sorted(pins.items()):
        have = installed.get(name)
        if have is None:
            problems.append(f"{name} missing (lock {version})")
        elif have != version:
            problems.append(f"{name} {have} (lock {version})")
    for name in sorted(set(installed) - set(pins) - UNLOCKED):
        problems.append(f"{name} {installed[name]} not in the lock")
    return problems


def main(argv: list[str]) -> int:
    installed = {normalize(d.metadata["Name"]): d.version for d in distributions()}
    problems = differences(read_locks(argv), installed)
    if problems:
        shown = ", ".join(problems[:6]) + (f" and {len(problems) - 6} more" if len(problems) > 6 else "")
        print(f"setup: {sys.prefix} differs from {' + '.join(argv)}: {shown}. "
              f"Delete that venv and run the set-up again.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
