"""Interpreters of the side venvs (a tool whose pins cannot share `.venv`), found one way.

A side venv is named by an argument, else an environment variable, else found as a sibling
of the running venv (`<sys.prefix>/../.venv-NAME`: every venv lives at the repository root,
scripts/setup.sh makes them). The check is a `find_spec` of the tool's module in that
interpreter (no import: ~50 ms), so a wrong or half-installed venv fails before any work
with the command that creates it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import MissingExtraError

_FIND_SPEC = "import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)"


@dataclass(frozen=True)
class SideVenv:
    """One side venv.

    Attributes:
        what: the tool, for messages ("llmcompressor").
        module: the module its interpreter must find.
        env_var: the environment variable naming its python.
        venv: the sibling folder name (".venv-llmcompressor").
        setup_command: what creates it.
    """

    what: str
    module: str
    env_var: str
    venv: str
    setup_command: str

    def candidate(self, python: Path | str | None = None) -> tuple[Path, str]:
        """The interpreter to use and where it came from (argument, variable or default)."""
        if python is not None:
            return Path(python), "argument"
        if os.environ.get(self.env_var):
            return Path(os.environ[self.env_var]), f"${self.env_var}"
        return Path(sys.prefix).parent / self.venv / "bin" / "python", "default"

    def resolve(self, python: Path | str | None = None, purpose: str = "") -> Path:
        """The checked interpreter.

        Raises:
            MissingExtraError: none there, or one without the module; the one-line message
                names the venv, the variable and the command that creates it.
        """
        candidate, origin = self.candidate(python)
        needs = f"{purpose} needs" if purpose else "needs"
        fix = f"create it with `{self.setup_command}` or set {self.env_var}"
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            raise MissingExtraError(f"{needs} the {self.what} venv, but its python {candidate} "
                                    f"({origin}) does not exist: {fix}")
        found = subprocess.run([str(candidate), "-c", _FIND_SPEC, self.module],
                               capture_output=True, check=False)
        if found.returncode != 0:
            raise MissingExtraError(f"{needs} {self.module} in {candidate} ({origin}), which "
                                    f"lacks it: {fix}")
        return candidate


LLMCOMPRESSOR = SideVenv("llmcompressor", "llmcompressor", "TOOLKIT_LLMCOMPRESSOR_PYTHON",
                         ".venv-llmcompressor", "bash scripts/setup-llmcompressor-venv.sh")
VLLM = SideVenv("vLLM", "vllm", "TOOLKIT_VLLM_PYTHON", ".venv-vllm",
                "bash scripts/setup-vllm-venv.sh")
