"""vLLM as a child process on a private loopback port, behind the gateway.

The gateway starts `PYTHON -m MODULE --port P ...` (PYTHON: `--vllm-python`, so vLLM can live
in its own venv with its own torch/transformers pins), waits for `/health`, forwards requests
with httpx, and watches the child: when it dies, the gateway logs its last output lines, answers
503 meanwhile and restarts it (up to `max_restarts` times). `stop()` sends SIGTERM to the
child's process group (vLLM forks engine workers) and SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import socket
import time
from pathlib import Path
from typing import Any, Literal

import httpx

from toolkit.errors import ToolkitError
from toolkit.processes import child_preexec, kill_group, owned_tempdir
from toolkit.serve.engines.base import EngineInfo

log = logging.getLogger("toolkit.serve")
HEALTH_POLL_S = 0.5
STOP_GRACE_S = 20.0


class EngineStartError(ToolkitError):
    """The engine did not become healthy; the message carries its last output lines."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class VllmEngine:
    """A `ProxyEngine` managing one vLLM OpenAI server.

    Args:
        info: what is served; `info.model_name` is the name vLLM serves it under.
        build_args: `port -> argv after the interpreter` (see `vllm_flags.vllm_args`).
        python: the interpreter that runs vLLM.
        module: the module run with `-m` (tests point it at a fake vLLM).
        env: the child's environment.
        startup_timeout_s: how long one start may take (compiling on CPU: minutes).
        max_restarts: restarts after crashes before giving up.
    """

    kind: Literal["proxy"] = "proxy"

    def __init__(self, info: EngineInfo, build_args: Any, python: Path, module: str,
                 env: dict[str, str], startup_timeout_s: float = 900.0,
                 max_restarts: int = 3) -> None:
        self.info = info
        self._build_args = build_args
        self._python = python
        self._module = module
        self._env = env
        self._startup_timeout_s = startup_timeout_s
        self.max_restarts = max_restarts
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.restarts = 0
        self.last_exit: int | None = None
        self.state = "stopped"
        self._proc: asyncio.subprocess.Process | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._ready = False
        self._client: httpx.AsyncClient | None = None
        self._tmp = owned_tempdir("toolkit-vllm-")

    @property
    def command(self) -> list[str]:
        """The child's full command line."""
        return [str(self._python), "-m", self._module,
                *self._build_args(self.port, Path(self._tmp.name))]

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self) -> None:
        """Start the child and wait until `/health` answers 200.

        Raises:
            EngineStartError: the child exited or did not become healthy in time.
        """
        self._stopping = False
        self._client = httpx.AsyncClient(
            base_url=self.base_url, timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )
        await self._spawn()
        self._tasks.append(asyncio.create_task(self._watch(), name="vllm-watch"))

    async def _spawn(self) -> None:
        self.state = "starting"
        command = self.command
        log.info("starting vLLM: %s", " ".join(command))
        self._proc = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL, env=self._env,
            preexec_fn=child_preexec(signal.SIGTERM),  # SIGTERM: vLLM stops its own workers
        )
        self._tasks.append(asyncio.create_task(self._pump(self._proc), name="vllm-log"))
        await self._wait_healthy(self._proc)
        self._ready = True
        self.state = "ready"
        log.info("vLLM ready on %s (pid %s)", self.base_url, self._proc.pid)

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self._tail.append(line)
            log.info("vllm: %s", line)

    async def _wait_healthy(self, proc: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        assert self._client is not None
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                await asyncio.sleep(0.1)  # let the log pump read the last lines
                raise EngineStartError(
                    f"vLLM exited with code {proc.returncode} while starting; last output: "
                    + " | ".join(list(self._tail)[-8:])
                )
            with contextlib.suppress(httpx.HTTPError):
                response = await self._client.get("/health", timeout=5.0)
                if response.status_code == 200:
                    return
            await asyncio.sleep(HEALTH_POLL_S)
        await self._kill(proc)
        raise EngineStartError(
            f"vLLM did not become healthy within {self._startup_timeout_s:.0f}s (raise "
            "startup_timeout_s, or pass `-- --enforce-eager` to skip compilation); last output: "
            + " | ".join(list(self._tail)[-8:])
        )

    async def _watch(self) -> None:
        """Restart the child when it dies, up to `max_restarts` times."""
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            code = await proc.wait()
            if self._stopping:
                return
            self._ready = False
            self.last_exit = code
            tail = " | ".join(list(self._tail)[-8:])
            if self.restarts >= self.max_restarts:
                self.state = "failed"
                log.error("vLLM exited with code %s and %d restarts are used up; serving 503. "
                          "Last output: %s", code, self.max_restarts, tail)
                return
            self.restarts += 1
            self.state = "restarting"
            log.error("vLLM exited with code %s; restarting (%d/%d). Last output: %s",
                      code, self.restarts, self.max_restarts, tail)
            try:
                await self._spawn()
            except EngineStartError as exc:
                log.error("vLLM restart failed: %s", exc)
                if self._proc is not None and self._proc.returncode is None:
                    await self._kill(self._proc)

    async def stop(self) -> None:
        """SIGTERM the child's process group, SIGKILL it after a grace period."""
        self._stopping = True
        self._ready = False
        if self._proc is not None and self._proc.returncode is None:
            await self._kill(self._proc)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._client is not None:
            await self._client.aclose()
        self.state = "stopped"
        self._tmp.cleanup()

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
            kill_group(proc.pid, sig)
            try:
                await asyncio.wait_for(proc.wait(), wait_s)
                return
            except asyncio.TimeoutError:
                log.warning("vLLM (pid %s) did not exit after %s", proc.pid, sig.name)

    def ready(self) -> bool:
        """Healthy and not restarting."""
        return self._ready and self._proc is not None and self._proc.returncode is None

    def status(self) -> dict[str, Any]:
        """State, restarts, last exit code, pid and port, for `/ready`."""
        return {"state": self.state, "restarts": self.restarts, "last_exit": self.last_exit,
                "pid": self.pid, "port": self.port}

    async def send(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST to vLLM and return the streamed response (the caller closes it)."""
        assert self._client is not None
        request = self._client.build_request("POST", path, json=body)
        return await self._client.send(request, stream=True)

    async def engine_metrics(self) -> tuple[bytes, str]:
        """vLLM's own `/metrics` text."""
        assert self._client is not None
        response = await self._client.get("/metrics", timeout=10.0)
        return response.content, response.headers.get("content-type", "text/plain; version=0.0.4")
