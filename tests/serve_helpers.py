"""Start a real gateway (uvicorn in a thread, 127.0.0.1, a free port) for live tests.

Used by the serve tests and by the monitoring end-to-end test:

    with running_gateway(tiny_model_dir) as base_url:
        httpx.post(f"{base_url}/v1/chat/completions", json={...})
"""

from __future__ import annotations

import contextlib
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class LiveGateway:
    """A running gateway: its base URL, the FastAPI app (and its `state.gateway`), the server."""

    base_url: str
    app: Any
    server: Any


@contextlib.contextmanager
def serve_app(app: Any, *, shutdown_timeout_s: float = 5.0,
              ready_timeout_s: float = 120.0) -> Iterator[LiveGateway]:
    """Run an app from `build_app`/`build_gateway` under uvicorn on a free loopback port."""
    from toolkit.serve import ServeSettings
    from toolkit.serve.server import make_server

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = ServeSettings(model="unused", host="127.0.0.1", port=port,
                           shutdown_timeout_s=shutdown_timeout_s)
    server = make_server(app, config, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="gateway")
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base_url}/ready", ready_timeout_s, _gateway_alive(app, thread))
        yield LiveGateway(base_url, app, server)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


@contextlib.contextmanager
def live_gateway(model_dir: Path | str, *, ready_timeout_s: float = 120.0,
                 **settings: Any) -> Iterator[LiveGateway]:
    """Like `running_gateway`, yielding the app and server too (for tests that look inside)."""
    from toolkit.serve import ServeSettings
    from toolkit.serve.server import build_gateway

    with tempfile.TemporaryDirectory(prefix="toolkit-gw-") as tmp:
        settings.setdefault("engine", "transformers")
        settings.setdefault("feedback_db", Path(tmp) / "feedback.db")
        settings.setdefault("shutdown_timeout_s", 5.0)
        config = ServeSettings(model=str(model_dir), **settings)
        app = build_gateway(config)
        with serve_app(app, shutdown_timeout_s=config.shutdown_timeout_s,
                       ready_timeout_s=ready_timeout_s) as gateway:
            yield gateway


@contextlib.contextmanager
def running_gateway(model_dir: Path | str, **settings: Any) -> Iterator[str]:
    """Serve `model_dir` (default engine: transformers) until the block ends; yields the base URL.

    Any `ServeSettings` field can be passed (engine, api_key, max_concurrency, max_queue,
    record_completions, feedback_db...); `feedback_db` defaults to a temporary file. Raises
    RuntimeError when the engine fails to start or is not ready within `ready_timeout_s`.
    """
    with live_gateway(model_dir, **settings) as gateway:
        yield gateway.base_url


def wait_ready(url: str, timeout_s: float, check: Callable[[], None] = lambda: None,
               interval_s: float = 0.05) -> None:
    """Poll `url` until it answers 200; `check` raises when the server died meanwhile.

    Shared by every test that starts a server (gateway thread or process, Prometheus), so a
    dead server fails fast with its own reason instead of at the timeout.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        time.sleep(interval_s)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f}s")


def _gateway_alive(app: Any, thread: threading.Thread) -> Callable[[], None]:
    def check() -> None:
        error = app.state.gateway.engine_error
        if error:
            raise RuntimeError(f"gateway engine failed to start: {error}")
        if not thread.is_alive():
            raise RuntimeError("gateway thread exited before becoming ready")

    return check


class FakeEngine:
    """A `GeneratingEngine` without a model, for testing the HTTP layer.

    Its answer to a message is `echo:` followed by the message's words, one word per token;
    the prompt has one token per word. `gate` (a threading.Event) holds every generation
    until it is set; `delay_s` sleeps between tokens. `cancelled` counts generations closed
    before their end (client disconnects), `finished` those that ran to the end.
    """

    kind = "generate"

    def __init__(self, name: str = "fake-model", max_model_len: int = 64, delay_s: float = 0.0,
                 gate: threading.Event | None = None) -> None:
        from toolkit.serve.engines.base import EngineInfo

        self.info = EngineInfo(name, "merged", "none", "fake", max_model_len, "/fake")
        self.delay_s = delay_s
        self.gate = gate
        self.started = False
        self.cancelled = 0
        self.finished = 0
        self.active = 0

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    def ready(self) -> bool:
        return self.started

    def status(self) -> dict[str, Any]:
        return {"state": "ready" if self.started else "stopped"}

    def prepare(self, request: Any) -> Any:
        from toolkit.serve.engines.base import PreparedRequest, context_error_message
        from toolkit.serve.protocol import OpenAIError

        if request.messages is not None:
            text = " ".join(m["content"] for m in request.messages)
        else:
            text = request.prompt or ""
        ids = list(range(max(1, len(text.split()))))
        limit, wanted = self.info.max_model_len, request.sampling.max_tokens
        if len(ids) >= limit or (wanted is not None and len(ids) + wanted > limit):
            raise OpenAIError(400, context_error_message(limit, len(ids), wanted or 1),
                              param="max_tokens", code="context_length_exceeded")
        return PreparedRequest(request, ids, wanted if wanted is not None else limit - len(ids))

    async def generate(self, prepared: Any) -> Any:
        import asyncio

        from toolkit.serve.engines.base import GenerationChunk

        request = prepared.request
        last = request.messages[-1]["content"] if request.messages is not None else request.prompt
        words = ["echo:"] + str(last).split()
        count = min(len(words), prepared.max_tokens)
        self.active += 1
        done = False
        try:
            for i in range(count):
                while self.gate is not None and not self.gate.is_set():
                    await asyncio.sleep(0.005)
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                finish = None
                if i == count - 1:
                    finish = "stop" if count == len(words) else "length"
                yield GenerationChunk(("" if i == 0 else " ") + words[i], 1, finish)
            done = True
        finally:
            self.active -= 1
            if done:
                self.finished += 1
            else:
                self.cancelled += 1


CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}]}


def sample(base_url: str, name: str, **labels: str) -> float:
    """The value of one series on /metrics (0 when absent)."""
    text = httpx.get(f"{base_url}/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def sse_events(body: str) -> list[str]:
    assert body.endswith("\n\n")
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


#: settings that start the fake vLLM child (tests/fake_vllm.py) instead of a real one
FAKE = {"engine": "vllm", "vllm_python": Path(sys.executable), "vllm_module": "tests.fake_vllm",
        "startup_timeout_s": 60.0}
