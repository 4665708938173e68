"""Write a stage's output folder all-or-nothing: train runs, export folders, compare reports.

Everything is written into a hidden temporary folder next to the target (same file system,
so the final rename is atomic) and renamed into place only once the caller's block finished
without an exception (for export: after the folder was verified). A failure, Ctrl-C or
SIGTERM removes the temporary folder and leaves an existing target untouched. Replacing a
folder (`--overwrite`) goes old -> backup, new -> target, then deletes the backup; if the
second rename fails the backup is put back. A folder left by a killed process (SIGKILL,
power loss) carries its pid in its name and is cleaned (a backup: restored) by the next
commit into the same parent. Train, whose work folder must outlive a crash so that
`--resume` continues it, uses `commit` alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.processes import pid_alive

PARTIAL_MARK = ".partial-"
BACKUP_MARK = ".replaced-"


class FolderExistsError(ToolkitError):
    """The target folder exists and `--overwrite` was not given."""


#: the name export's callers and tests know it by
ExportExistsError = FolderExistsError


def refuse_existing(target: Path, overwrite: bool) -> None:
    """Raise unless `target` is free or may be replaced."""
    if target.exists() and not overwrite:
        raise FolderExistsError(
            f"{target} already exists; pass --overwrite to replace it (the old folder stays "
            "untouched until the new one is complete and verified)"
        )


def clean_stale(parent: Path) -> list[Path]:
    """Remove temporary folders of dead processes under `parent`, and put back a backup whose
    process died between the two renames of `commit`."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for item in parent.iterdir():
        for mark in (PARTIAL_MARK, BACKUP_MARK):
            if item.name.startswith(".") and mark in item.name:
                pid_text = item.name.split(mark, 1)[1].split("-", 1)[0]
                if pid_text.isdigit() and not pid_alive(int(pid_text)):
                    if mark == BACKUP_MARK:
                        _restore_orphan_backup(item, mark)
                    else:
                        shutil.rmtree(item, ignore_errors=True)
                    removed.append(item)
    return removed


def _restore_orphan_backup(backup: Path, mark: str) -> None:
    """A backup whose process died between the two renames is the only copy: put it back."""
    target = backup.parent / backup.name[1:].split(mark, 1)[0]
    if target.exists():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.rename(target)


def _temp_name(target: Path, mark: str) -> Path:
    return target.parent / f".{target.name}{mark}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def commit(work: Path, target: Path) -> None:
    """Move the finished `work` folder to `target`, replacing it through a backup.

    `work` must be on the same file system (a sibling). If the second rename fails the
    backup is renamed back, so `target` is always either the old folder or the new one.
    """
    if not target.exists():
        work.rename(target)
        return
    backup = _temp_name(target, BACKUP_MARK)
    target.rename(backup)
    try:
        work.rename(target)
    except BaseException:
        backup.rename(target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def atomic_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `target` when the block succeeds.

    Raises:
        FolderExistsError: `target` exists and `overwrite` is False (checked before any work).
    """
    target = Path(target)
    refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent)
    work = _temp_name(target, PARTIAL_MARK)
    work.mkdir()
    try:
        yield work
        commit(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the block, so cleanup handlers run.

    Python's default SIGTERM ends the process without unwinding, which would leave a
    temporary folder behind; only the main thread may install handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
