"""A real Prometheus for tests: started on a free loopback port, stopped by PID afterwards.

Used by the snapshot test with a fake metrics server and by the end-to-end test with the real
gateway, so both exercise the same binary and HTTP API that production uses.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve_helpers import wait_ready

STARTUP_TIMEOUT_S = 15.0


def prometheus_binary() -> str:
    """The `prometheus` executable, or skip the test naming how to install it."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus binary not found; apt-get install prometheus")
    return binary


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_prometheus(config_text: str, tmp_path: Path) -> Iterator[str]:
    """Run Prometheus with `config_text` until the block exits; yields its base URL.

    Storage, config and log live under `tmp_path`. Startup waits on `/-/ready`, bounded, and
    the log is shown if Prometheus exits or never gets ready.
    """
    root = tmp_path / "prometheus"
    root.mkdir(parents=True, exist_ok=True)
    config = root / "prometheus.yml"
    config.write_text(config_text, encoding="utf-8")
    log_path = root / "prometheus.log"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [prometheus_binary(), f"--config.file={config}",
             f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(process, base_url, log_path)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    def alive() -> None:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}")

    try:
        wait_ready(f"{base_url}/-/ready", STARTUP_TIMEOUT_S, alive, interval_s=0.2)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}:\n{log_path.read_text(errors='replace')[-2000:]}") from exc


def query(base_url: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result vector (empty when nothing matches yet)."""
    response = httpx.get(f"{base_url}/api/v1/query", params={"query": expr}, timeout=5)
    response.raise_for_status()
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


def wait_for(base_url: str, expr: str, timeout_s: float = 20.0,
             tick: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Poll an instant query until it returns a sample, calling `tick()` between polls.

    `tick` lets the caller keep producing traffic while Prometheus scrapes, so `rate()` has
    two different samples to work with.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        result = query(base_url, expr)
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"no sample for {expr!r} at {base_url} within {timeout_s}s")
