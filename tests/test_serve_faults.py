"""Hostile clients and faults against a live gateway: no request stalls others or answers 500.

Covers issue 12: a stream that fails mid-way ends with an error event and `[DONE]` and counts as
500; abandoned non-streamed requests stop generating and count as 499; requests without
`max_tokens` are capped; uploads that stop or crawl count as 499 or get 408; a request cut at
the shutdown timeout gets an OpenAI-shaped error.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from tests.serve_helpers import (
    CHAT,
    FakeEngine,
    LiveGateway,
    live_gateway,
    sample,
    serve_app,
    sse_events,
)
from toolkit.cli import app as cli_app
from toolkit.feedback.store import FeedbackStore
from toolkit.monitoring.metrics import GatewayMetrics
from toolkit.serve import ServeSettings
from toolkit.serve.app import build_app

LABELS = {"model": "fake-model", "engine": "fake"}
#: a message the fake engine answers word by word: 2001 tokens, minutes at its delay
LONG = {"messages": [{"role": "user", "content": "word " * 2000}]}


class CountingEngine(FakeEngine):
    """A fake engine that counts the tokens it produced and can fail after `fail_after` tokens."""

    def __init__(self, fail_after: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_after = fail_after
        self.tokens = 0

    async def generate(self, prepared: Any) -> Any:
        async for chunk in super().generate(prepared):
            if self.fail_after is not None and self.tokens >= self.fail_after:
                raise ValueError("a bug in the engine")  # not an OpenAIError nor a RuntimeError
            self.tokens += chunk.tokens
            yield chunk


@contextlib.contextmanager
def gateway_over(tmp_path: Path, engine: FakeEngine, *, shutdown_timeout_s: float = 5.0,
                 **settings: Any) -> Iterator[LiveGateway]:
    """A live gateway over `engine` with these `ServeSettings`."""
    config = ServeSettings(model="fake", feedback_db=tmp_path / "feedback.db", **settings)
    app = build_app(config, engine, GatewayMetrics(CollectorRegistry()),
                    FeedbackStore(config.feedback_db))
    with serve_app(app, shutdown_timeout_s=shutdown_timeout_s) as live:
        yield live


def wait_for(condition: Any, timeout_s: float = 20.0) -> bool:
    """Poll `condition()` until it is true or `timeout_s` passed; its last value."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(condition())


def requests_total(url: str, status: int) -> float:
    return sample(url, "toolkit_requests_total", endpoint="chat", status=str(status), **LABELS)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def start_upload(port: int, sent: bytes, content_length: int) -> socket.socket:
    """A raw client that sent its headers and `sent` of a `content_length`-byte body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\n"
                 + f"Content-Length: {content_length}\r\n\r\n".encode() + sent)
    return sock


class RecordedLogs(logging.Handler):
    """Every record of the gateway's and uvicorn's loggers while installed."""

    LOGGERS = ("toolkit.serve", "uvicorn")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Self:
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        self._levels = {name: logging.getLogger(name).level for name in self.LOGGERS}
        logging.getLogger("toolkit.serve").setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(self._levels[name])


def test_engine_failure_mid_stream_is_an_error_event_and_a_500(tmp_path):
    engine = CountingEngine(fail_after=2)
    with gateway_over(tmp_path, engine) as live, RecordedLogs() as logs:
        url = live.base_url
        before = {status: requests_total(url, status) for status in (200, 499, 500)}
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                          json={**CHAT, "messages": [{"role": "user", "content": "a b c d"}],
                                "stream": True}) as resp:
            assert resp.status_code == 200
            events = sse_events(resp.read().decode())
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and error["message"] == "internal error: ValueError"
        sent = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-2])
        assert sent == "echo: a"  # the text decoded before the failure still arrived
        assert requests_total(url, 500) == before[500] + 1
        assert requests_total(url, 499) == before[499]
        assert requests_total(url, 200) == before[200]
        # the bug is logged once, with its traceback, on the gateway's logger
        failures = [r for r in logs.records if "failed" in r.getMessage()]
        assert len(failures) == 1 and failures[0].exc_info is not None


def test_abandoned_non_streamed_requests_stop_generating(tmp_path):
    engine = CountingEngine(max_model_len=4096, delay_s=0.01)
    with gateway_over(tmp_path, engine, max_concurrency=4) as live:
        url = live.base_url
        clients = 4

        def give_up_after_1s(_: int) -> str:
            try:
                httpx.post(f"{url}/v1/chat/completions", json=LONG, timeout=1.0)
            except httpx.ReadTimeout:
                return "gave up"
            return "answered"

        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            assert list(pool.map(give_up_after_1s, range(clients))) == ["gave up"] * clients
        # each of the 4 would decode 2001 tokens (20 s) for nobody; they stop within a second
        assert wait_for(lambda: engine.active == 0, timeout_s=10.0)
        stopped_at = engine.tokens
        time.sleep(0.5)
        assert engine.tokens == stopped_at < clients * 400
        assert engine.cancelled == clients and engine.finished == 0
        assert wait_for(lambda: requests_total(url, 499) == clients)
        assert requests_total(url, 200) == 0 and requests_total(url, 500) == 0
        assert sample(url, "toolkit_requests_running", **LABELS) == 0
        resp = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
        assert resp.status_code == 200  # the slots came back


def test_abandoned_request_leaves_the_model_batch(tiny_model_dir):
    with live_gateway(tiny_model_dir, model_name="tiny", threads=1) as live:
        scheduler = live.app.state.gateway.engine.scheduler
        request = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 1000,
                   "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.base_url}/v1/chat/completions", json=request, timeout=0.5)
        at_disconnect = scheduler.stats.rows_decoded
        # greedy, this prompt decodes all 1000 tokens (~2 s here): the rest was for nobody
        assert wait_for(lambda: not scheduler._active and not scheduler._pending, timeout_s=5.0)
        time.sleep(0.5)
        assert scheduler.stats.rows_decoded - at_disconnect < 300


def test_requests_without_max_tokens_get_the_default_cap(tmp_path):
    engine = FakeEngine(max_model_len=4096)
    with gateway_over(tmp_path, engine, max_tokens_default=5) as live:
        url = f"{live.base_url}/v1/chat/completions"
        capped = httpx.post(url, json=LONG, timeout=30).json()
        assert capped["choices"][0]["finish_reason"] == "length"
        assert capped["usage"]["completion_tokens"] == 5
        asked = httpx.post(url, json={**LONG, "max_tokens": 12}, timeout=30).json()
        assert asked["usage"]["completion_tokens"] == 12  # more than the default, on request
        with httpx.stream("POST", url, timeout=30,
                          json={**LONG, "stream": True,
                                "stream_options": {"include_usage": True}}) as resp:
            events = sse_events(resp.read().decode())
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 5


def test_uploads_cut_by_the_client_are_499_without_traceback(tmp_path):
    uploads = 6
    with gateway_over(tmp_path, FakeEngine()) as live, RecordedLogs() as logs:
        url = live.base_url
        for _ in range(uploads):
            sock = start_upload(port_of(url), b'{"messages": [', content_length=1000)
            time.sleep(0.05)  # the gateway is reading the body
            sock.close()
        assert wait_for(lambda: requests_total(url, 499) == uploads)
        assert requests_total(url, 500) == 0
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30).status_code == 200
    assert not [r for r in logs.records if r.exc_info or r.levelno >= logging.ERROR]
    closed = [r for r in logs.records if "closed the connection" in r.getMessage()]
    assert len(closed) == uploads


def test_slow_upload_gets_408_and_the_connection_closes(tmp_path):
    with gateway_over(tmp_path, FakeEngine(), body_timeout_s=1.0) as live:
        url = live.base_url
        # a body in two parts well within the timeout is fine
        body = json.dumps(CHAT).encode()
        sock = start_upload(port_of(url), body[:10], content_length=len(body))
        time.sleep(0.3)
        sock.sendall(body[10:])
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.close()
        # a body that stalls gets 408 after body_timeout_s, then the connection closes
        started = time.monotonic()
        sock = start_upload(port_of(url), body[:10], content_length=len(body))
        answer = b""
        while chunk := sock.recv(65536):  # ends when the gateway closes the connection
            answer += chunk
        sock.close()
        assert 0.9 < time.monotonic() - started < 15
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert b"connection: close" in head.lower()
        assert json.loads(payload)["error"]["code"] == "request_timeout"
        assert requests_total(url, 408) == 1 and requests_total(url, 500) == 0
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def test_requests_cut_at_the_shutdown_timeout_get_openai_errors(tmp_path):
    engine = FakeEngine(max_model_len=4096, delay_s=0.02)
    with gateway_over(tmp_path, engine, shutdown_timeout_s=1.0) as live:
        url = live.base_url
        lines: list[str] = []
        streaming = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                              json={**LONG, "stream": True}) as resp:
                for line in resp.iter_lines():
                    if line:
                        lines.append(line)
                        streaming.set()

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            streamed = pool.submit(stream)
            whole = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=LONG, timeout=30)
            assert streaming.wait(30) and wait_for(lambda: engine.active == 2)
            live.server.should_exit = True  # what SIGTERM does
            streamed.result(timeout=30)
            answer = whole.result(timeout=30)
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"]["code"] == "server_shutting_down"
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][len("data: "):])["error"]["code"] == "server_shutting_down"
    assert engine.cancelled == 2


def test_cli_exposes_the_lifecycle_limits():
    result = CliRunner().invoke(cli_app, ["serve", "--help"],
                                env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0
    for option in ("--max-tokens-default", "--body-timeout-s", "--shutdown-timeout-s"):
        assert option in result.output
    settings = ServeSettings(model="m")
    assert (settings.max_tokens_default, settings.body_timeout_s,
            settings.shutdown_timeout_s) == (1024, 30.0, 30.0)


@pytest.fixture()
def slow_fake_vllm(monkeypatch):
    """The fake vLLM child, answering one word per 50 ms (400 words take 20 s)."""
    from tests.conftest import REPO_ROOT
    from tests.serve_helpers import FAKE

    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    monkeypatch.setenv("FAKE_VLLM_TOKEN_DELAY_S", "0.05")
    return FAKE


def test_vllm_request_abandoned_before_its_answer_is_499(slow_fake_vllm, tiny_model_dir):
    with live_gateway(tiny_model_dir, model_name="assistant", **slow_fake_vllm) as live:
        url = live.base_url
        request = {"messages": [{"role": "user", "content": "word " * 500}], "max_tokens": 400}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=request, timeout=1.0)
        labels = {"model": "assistant", "engine": "vllm"}
        assert wait_for(lambda: sample(url, "toolkit_requests_total", endpoint="chat",
                                       status="499", **labels) == 1, timeout_s=10.0)
        assert sample(url, "toolkit_requests_running", **labels) == 0


def test_vllm_dying_mid_stream_is_an_error_event_and_a_500(slow_fake_vllm, tiny_model_dir):
    import os
    import signal

    with live_gateway(tiny_model_dir, model_name="assistant", **slow_fake_vllm) as live:
        url = live.base_url
        lines: list[str] = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30, json={
                "messages": [{"role": "user", "content": "word " * 500}], "max_tokens": 400,
                "stream": True}) as resp:
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                if '"content": "fake"' in line:
                    os.kill(live.app.state.gateway.engine.pid, signal.SIGKILL)
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][len("data: "):])["error"]["type"] == "server_error"
        labels = {"model": "assistant", "engine": "vllm", "endpoint": "chat"}
        assert sample(url, "toolkit_requests_total", status="500", **labels) == 1
        assert sample(url, "toolkit_requests_total", status="499", **labels) == 0
