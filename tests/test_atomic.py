"""The one folder commit of every stage (train, export, compare): all-or-nothing, with rollback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from toolkit.atomic import FolderExistsError, atomic_dir, clean_stale, commit


def test_atomic_dir_commits_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "fmt"
    with pytest.raises(RuntimeError), atomic_dir(target) as work:
        (work / "weights.bin").write_text("half")
        raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as work:
        (work / "weights.bin").write_text("v1")
    assert (target / "weights.bin").read_text() == "v1"
    with pytest.raises(FolderExistsError), atomic_dir(target):
        pass
    with pytest.raises(KeyboardInterrupt), atomic_dir(target, overwrite=True) as work:
        (work / "weights.bin").write_text("v2")
        raise KeyboardInterrupt
    assert (target / "weights.bin").read_text() == "v1"
    with atomic_dir(target, overwrite=True) as work:
        (work / "weights.bin").write_text("v2")
    assert (target / "weights.bin").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmt"]


def test_stale_folders_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    dead = 2**22 + 12345  # above the default pid_max: never a live process
    (tmp_path / f".merged.partial-{dead}-abcd").mkdir()
    (tmp_path / f".onnx.replaced-{dead}-abcd").mkdir()  # killed between the two renames
    (tmp_path / f".gptq.partial-{os.getpid()}-abcd").mkdir()  # a live export: kept
    clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".gptq.partial-{os.getpid()}-abcd", "onnx"]


def test_commit_puts_the_old_folder_back_when_the_new_one_cannot_move_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target, work = tmp_path / "run", tmp_path / ".run.partial"
    target.mkdir()
    (target / "manifest.json").write_text("old")
    work.mkdir()
    (work / "manifest.json").write_text("new")
    real = Path.rename

    def failing(self: Path, dest: Path) -> Path:
        if self == work:
            raise OSError("disk gone")
        return real(self, dest)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="disk gone"):
        commit(work, target)
    assert (target / "manifest.json").read_text() == "old"
    monkeypatch.undo()
    commit(work, target)
    assert (target / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

