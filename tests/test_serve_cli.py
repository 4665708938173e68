"""`toolkit serve` as users type it, and graceful shutdown of a real server on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import REPO_ROOT
from toolkit.cli import app
from toolkit.errors import ConfigError
from toolkit.serve import ServeSettings


def test_serve_help_lists_options():
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0
    for option in ("--engine", "--api-key", "--max-concurrency", "--max-queue",
                   "--record-completions", "--vllm-python", "--tensor-parallel-size"):
        assert option in result.output


def test_bad_engine_is_a_one_line_error(tiny_model_dir):
    result = CliRunner().invoke(app, ["serve", str(tiny_model_dir), "--engine", "tgi"])
    assert result.exit_code == 2
    assert "engine" in result.output and "onnxruntime" in result.output


def test_missing_model_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "nothing"), "--engine", "transformers"])
    assert result.exit_code == 1 and "nothing" in result.output


def test_settings_collect_every_problem():
    with pytest.raises(ConfigError) as info:
        ServeSettings(model="m", engine="transformers", port=-1, max_concurrency=0,
                      engine_args=["--enforce-eager"])
    message = str(info.value)
    assert "port" in message and "max_concurrency" in message


def test_extra_args_only_for_vllm(tiny_model_dir):
    result = CliRunner().invoke(app, ["serve", str(tiny_model_dir), "--engine", "transformers",
                                      "--", "--enforce-eager"])
    assert result.exit_code == 1 and "only pass through to vLLM" in result.output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_finishes_in_flight_stream_then_exits(tiny_model_dir, tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "toolkit", "serve", str(tiny_model_dir), "--engine", "transformers",
         "--port", str(port), "--feedback-db", str(tmp_path / "fb.db"), "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("server not ready in 120 s")
        received: list[str] = []
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
                    "prompt": "Hello", "max_tokens": 400, "temperature": 0, "stream": True}) as resp:
                for line in resp.iter_lines():
                    if line:
                        received.append(line)
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert received[-1] == "data: [DONE]"  # the in-flight stream finished
        events = [json.loads(line[6:]) for line in received if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_empty_api_key_is_a_one_line_error(tiny_model_dir):
    result = CliRunner().invoke(app, ["serve", str(tiny_model_dir), "--api-key", ""])
    assert result.exit_code == 1
    assert "--api-key" in result.output and len(result.output.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="api_key"):
        ServeSettings(model="m", api_key="  ")


def test_api_key_from_file_or_env(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    assert ServeSettings(model="m", api_key_file=key_file).api_key == "s3cret"
    seen = {}
    monkeypatch.setattr("toolkit.serve.run_server", lambda settings: seen.update(key=settings.api_key))
    runner = CliRunner()
    result = runner.invoke(app, ["serve", "m", "--api-key-file", str(key_file)])
    assert result.exit_code == 0 and seen["key"] == "s3cret"
    result = runner.invoke(app, ["serve", "m"], env={"TOOLKIT_API_KEY": "from-env"})
    assert result.exit_code == 0 and seen["key"] == "from-env"


@pytest.mark.parametrize("content, problem", [("\n", "is empty"), (None, "cannot read")])
def test_bad_api_key_file_names_the_option(tmp_path, content, problem):
    key_file = tmp_path / "key"
    if content is not None:
        key_file.write_text(content)
    result = CliRunner().invoke(app, ["serve", "m", "--api-key-file", str(key_file)])
    assert result.exit_code == 1 and "api_key_file" in result.output and problem in result.output


def test_api_key_given_twice_is_an_error(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("a")
    with pytest.raises(ConfigError, match="api_key_file: give the key once"):
        ServeSettings(model="m", api_key="b", api_key_file=key_file)


@pytest.mark.parametrize("host, key, warns", [
    ("0.0.0.0", None, True), ("::", None, True), ("gateway.example", None, True),
    ("0.0.0.0", "k", False), ("127.0.0.1", None, False), ("::1", None, False),
    ("localhost", None, False),
])
def test_open_bind_without_key_warns(caplog, host, key, warns):
    from toolkit.serve.server import warn_if_open

    with caplog.at_level("WARNING", logger="toolkit.serve"):
        assert warn_if_open(ServeSettings(model="m", host=host, api_key=key)) is warns
    assert ("no API key" in caplog.text) is warns
