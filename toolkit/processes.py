"""Child processes and temporary folders that do not outlive the toolkit process that made them.

A `toolkit export` killed with SIGKILL (an OOM kill, a CI timeout) runs no cleanup code, so a
child it started kept running: the ONNX exporter went on for 30 s at 88 % CPU and 1.8 GB, and
its `/tmp/toolkit-onnx-*` folder stayed. Two guards, both here so every child gets the same:

- `bind_to_parent` asks Linux to signal the child when its parent dies (`PR_SET_PDEATHSIG`),
  then checks the parent did not die before the request took effect. `child_preexec` adds a
  session of its own, so the child's descendants can be stopped as one process group, and a
  Ctrl-C in the terminal reaches only the parent, which stops the child itself.
- `owned_tempdir` names a folder after the pid that owns it; `clean_stale_tempdirs` removes
  only those whose owner is dead (another live run's folder is never touched).

Linux sends the parent-death signal when the *thread* that forked the child exits, so children
are started from a thread that lives as long as they should (the main thread, an event loop).
Other systems get the process group and the stale-folder cleanup only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@cache
def _prctl() -> Callable[..., int] | None:
    """libc's `prctl` on Linux, else None.

    Loaded in the parent: a forked child of a threaded process must not import (the import
    lock may be held by a thread that did not survive the fork).
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def bind_to_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Have this process receive `sig` when `parent_pid`, its parent, dies.

    Runs in the child: through `child_preexec`, or as a multiprocessing pool `initializer`.
    A parent that died before the request took effect can no longer signal, so the child
    then ends itself.
    """
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def child_preexec(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` that gives the child its own session and binds it to this process.

    Args:
        sig: what the child gets when this process dies: SIGKILL for workers that hold no
            state worth saving, SIGTERM for servers that stop their own workers cleanly.
    """
    parent_pid = os.getpid()
    _prctl()

    def _preexec() -> None:  # pragma: no cover - runs in the child, between fork and exec
        os.setsid()
        bind_to_parent(parent_pid, sig)

    return _preexec


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the process group a `child_preexec` child leads (gone already: nothing to do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def run_child(command: list[str], timeout: float | None = None,
              **kwargs: Any) -> subprocess.CompletedProcess:
    """`subprocess.run` for a child that must not outlive this process.

    The child gets its own session and dies with this process (`child_preexec`); on any
    exception while waiting (Ctrl-C, SIGTERM turned into KeyboardInterrupt, the timeout) its
    whole process group is killed, not only the child as `subprocess.run` would.

    Args:
        command: the argv.
        timeout: seconds to wait before killing the group (`subprocess.TimeoutExpired`).
        **kwargs: passed to `subprocess.Popen` (`env`, `text`, `capture_output` ...).
    """
    if kwargs.pop("capture_output", False):
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    # preexec_fn is safe here: it only makes system calls (prctl loaded beforehand), no
    # imports or locks a thread of the parent could hold
    with subprocess.Popen(command, preexec_fn=child_preexec(), **kwargs) as process:  # noqa: PLW1509
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:
            kill_group(process.pid)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def owned_tempdir(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary folder `PREFIX<pid>-<random>` that `clean_stale_tempdirs` can attribute.

    Folders of dead owners under the same prefix are removed first, so a killed run's
    leftovers go at the next run.
    """
    clean_stale_tempdirs(prefix)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-")


def clean_stale_tempdirs(prefix: str, root: Path | None = None) -> list[Path]:
    """Remove `root/PREFIX<pid>-*` folders (default root: the temp dir) whose pid is dead.

    Only this user's folders are considered, and a pid that exists keeps its folder even if
    it was reused by an unrelated process: the error is always on the side of keeping.

    Returns:
        The folders removed.
    """
    root = Path(root or tempfile.gettempdir())
    removed: list[Path] = []
    with contextlib.suppress(OSError):
        for item in root.glob(f"{prefix}*-*"):
            pid_text = item.name[len(prefix):].split("-", 1)[0]
            if not pid_text.isdigit() or pid_alive(int(pid_text)):
                continue
            with contextlib.suppress(OSError):
                if item.is_dir() and not item.is_symlink() and item.stat().st_uid == os.getuid():
                    shutil.rmtree(item)
                    removed.append(item)
    return removed
