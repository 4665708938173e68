"""Files shipped beside the package (`configs/`, `data/`, `monitoring/`), found from the install.

They stay at the repository root rather than becoming package data: the Compose file mounts
`monitoring/`, the tests, README and scripts name `configs/model/*.yaml` and `data/*.jsonl`,
and toolkit is installed editable from its checkout (`scripts/venv.sh`), so the root is
always `toolkit/..`. Moving them into the package would change every one of those paths for
no gain. The one non-editable install, the serving image, needs none of them; any other
install without the checkout gets an error naming the missing file and the flag to pass.
"""

from __future__ import annotations

from pathlib import Path

from toolkit.errors import ToolkitError

#: the folder holding `toolkit/`, `configs/`, `data/` and `monitoring/`
ROOT = Path(__file__).resolve().parents[1]


class ShippedFileError(ToolkitError):
    """A file that ships with the repository is absent from this installation."""


def shipped_file(relative: str | Path, flag: str) -> Path:
    """The installation's copy of a shipped file, for a default that must not depend on the cwd.

    Args:
        relative: the path from the repository root, e.g. "data/test.jsonl".
        flag: the option that overrides the default, named in the error.

    Raises:
        ShippedFileError: this installation has no repository checkout around the package.
    """
    path = ROOT / relative
    if not path.exists():
        raise ShippedFileError(
            f"{flag}: the default {relative} is not in this installation ({ROOT}); "
            f"pass {flag} PATH"
        )
    return path


def resolve_user_path(path: Path) -> Path:
    """`path` as typed when it exists from the cwd, else the shipped file of that name.

    So `toolkit train configs/model/smollm2-135m.yaml`, and the `data/train.jsonl` such a
    config names, work from any folder; a path found nowhere is returned unchanged so the
    error names it as the user typed it.
    """
    if path.is_absolute() or path.exists():
        return path
    candidate = ROOT / path
    return candidate if candidate.exists() else path
