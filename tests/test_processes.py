"""Children die with a SIGKILLed toolkit process; a killed run's temp folders go at the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from toolkit.processes import clean_stale_tempdirs, owned_tempdir, pid_alive

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the parent-death signal is Linux-only")

#: a parent that starts a sleeping child the way the ONNX export does and prints its pid
RUN_CHILD_PARENT = """
    import sys
    from pathlib import Path
    from toolkit.processes import run_child
    pid_file = Path(sys.argv[1])
    run_child([sys.executable, "-c",
               f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
               "time.sleep(120)"])
"""
#: a parent that scores in a spawned pool worker the way `toolkit compare` does
POOL_PARENT = """
    import multiprocessing, os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from pathlib import Path
    from toolkit.processes import bind_to_parent
    if __name__ == "__main__":
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=context, initializer=bind_to_parent,
                                 initargs=(os.getpid(),)) as pool:
            future = pool.submit(time.sleep, 120)
            time.sleep(1.0)  # the worker has run its initializer and took the task
            Path(sys.argv[1]).write_text(str(next(iter(pool._processes))))
            future.result()
"""


def _gone(pid: int) -> bool:
    """Dead or a zombie waiting for a reaper (a container's init may not reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.mark.parametrize("script", [RUN_CHILD_PARENT, POOL_PARENT], ids=["run_child", "pool"])
def test_child_dies_with_sigkilled_parent(tmp_path: Path, script: str):
    pid_file = tmp_path / "child.pid"
    (tmp_path / "parent.py").write_text(textwrap.dedent(script))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(pid_file)],
                              env=env)
    child = None
    try:
        deadline = time.monotonic() + 30
        while child is None and time.monotonic() < deadline:
            assert parent.poll() is None, "the parent exited before starting its child"
            if pid_file.is_file() and pid_file.read_text().strip():
                child = int(pid_file.read_text())
            time.sleep(0.05)
        assert child is not None and not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), f"child {child} outlived its SIGKILLed parent"
    finally:
        parent.kill()
        if child is not None and not _gone(child):
            os.kill(child, signal.SIGKILL)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names no process now
    assert not pid_alive(child.pid)
    return child.pid


def test_stale_temp_folder_of_a_dead_pid_is_removed_a_live_one_kept(tmp_path: Path):
    dead = tmp_path / f"toolkit-test-{_dead_pid()}-abc"
    live = tmp_path / f"toolkit-test-{os.getpid()}-def"
    unrelated = tmp_path / "toolkit-test-notapid"
    for folder in (dead, live, unrelated):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    assert clean_stale_tempdirs("toolkit-test-", root=tmp_path) == [dead]
    assert not dead.exists() and live.is_dir() and unrelated.is_dir()


def test_owned_tempdir_carries_the_owner_pid():
    with owned_tempdir("toolkit-test-") as name:
        assert Path(name).name.startswith(f"toolkit-test-{os.getpid()}-")
        assert clean_stale_tempdirs("toolkit-test-") == []
        assert Path(name).is_dir()
