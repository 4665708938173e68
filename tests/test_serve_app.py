"""The gateway's HTTP layer over a fake engine: routes, SSE format, errors, auth, queue, metrics."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.serve_helpers import CHAT, FakeEngine, sample, serve_app, sse_events
from toolkit.feedback.store import FeedbackStore
from toolkit.monitoring.contract import exposed_series_names
from toolkit.monitoring.metrics import GatewayMetrics
from toolkit.serve import ServeSettings
from toolkit.serve.app import build_app


def make_gateway(tmp_path: Path, engine: FakeEngine | None = None, **settings):
    engine = engine or FakeEngine()
    config = ServeSettings(model="fake", feedback_db=tmp_path / "feedback.db", **settings)
    app = build_app(config, engine, GatewayMetrics(CollectorRegistry()),
                    FeedbackStore(config.feedback_db))
    return serve_app(app)


@pytest.fixture()
def gateway(tmp_path: Path):
    with make_gateway(tmp_path) as live:
        yield live


def test_models_health_ready(gateway):
    models = httpx.get(f"{gateway.base_url}/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["fake-model"]
    assert httpx.get(f"{gateway.base_url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.base_url}/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_chat_completion_body(gateway):
    body = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=CHAT).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "fake-model"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "echo: hello there"}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_max_tokens_gives_length(gateway):
    body = httpx.post(f"{gateway.base_url}/v1/chat/completions",
                      json={**CHAT, "max_tokens": 2}).json()
    assert body["choices"][0]["message"]["content"] == "echo: hello"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_chat_stream_format(gateway):
    payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", json=payload) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp.read().decode())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "echo: hello there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_stream_without_usage_has_no_usage_chunk(gateway):
    with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions",
                      json={**CHAT, "stream": True}) as resp:
        chunks = [json.loads(e) for e in sse_events(resp.read().decode())[:-1]]
    assert all(c["choices"] for c in chunks)


def test_text_completion_and_stream(gateway):
    body = httpx.post(f"{gateway.base_url}/v1/completions",
                      json={"prompt": "one two", "max_tokens": 5}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "echo: one two"
    with httpx.stream("POST", f"{gateway.base_url}/v1/completions",
                      json={"prompt": "one two", "stream": True}) as resp:
        events = sse_events(resp.read().decode())
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "echo: one two"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


BAD_REQUESTS = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"{}", 400, "messages"),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), 400, "messages.0.role"),
    (json.dumps({**CHAT, "model": "gpt-9"}).encode(), 404, "model"),
    (json.dumps({**CHAT, "temperature": 3}).encode(), 400, "temperature"),
    (json.dumps({**CHAT, "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({**CHAT, "top_p": -0.1}).encode(), 400, "top_p"),
    (json.dumps({**CHAT, "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({**CHAT, "max_tokens": 10_000}).encode(), 400, "max_tokens"),
    (json.dumps({**CHAT, "n": 2}).encode(), 400, "n"),
    (json.dumps({**CHAT, "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "stop"),
    (json.dumps({**CHAT, "seed": "x"}).encode(), 400, "seed"),
    (json.dumps({**CHAT, "ignore_eos": "yes"}).encode(), 400, "ignore_eos"),
    (json.dumps({**CHAT, "ignore_eos": 1}).encode(), 400, "ignore_eos"),
    (json.dumps({**CHAT, "min_tokens": -1}).encode(), 400, "min_tokens"),
    (json.dumps({**CHAT, "min_tokens": 2.5}).encode(), 400, "min_tokens"),
    (json.dumps({**CHAT, "min_tokens": True}).encode(), 400, "min_tokens"),
    (json.dumps({**CHAT, "max_tokens": 4, "min_tokens": 5}).encode(), 400, "min_tokens"),
    (json.dumps({**CHAT, "max_completion_tokens": 4, "min_tokens": 5}).encode(), 400, "min_tokens"),
    (json.dumps({**CHAT, "cache_salt": ""}).encode(), 400, "cache_salt"),
    (json.dumps({**CHAT, "cache_salt": "x" * 257}).encode(), 400, "cache_salt"),
    (json.dumps({**CHAT, "cache_salt": 7}).encode(), 400, "cache_salt"),
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(gateway, body, status, param):
    resp = httpx.post(f"{gateway.base_url}/v1/chat/completions", content=body,
                      headers={"content-type": "application/json"})
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    # the server keeps serving
    assert httpx.post(f"{gateway.base_url}/v1/chat/completions", json=CHAT).status_code == 200


def test_unknown_route_and_method_are_openai_errors(gateway):
    resp = httpx.get(f"{gateway.base_url}/v1/nothing")
    assert resp.status_code == 404 and "error" in resp.json()
    resp = httpx.get(f"{gateway.base_url}/v1/chat/completions")
    assert resp.status_code == 405 and "error" in resp.json()


def test_prompt_over_context_is_400(gateway):
    long = {"messages": [{"role": "user", "content": "word " * 100}]}
    resp = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=long)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"


def test_engine_metrics_404_for_embedded(gateway):
    resp = httpx.get(f"{gateway.base_url}/metrics/engine")
    assert resp.status_code == 404 and "error" in resp.json()


def test_api_key(tmp_path):
    with make_gateway(tmp_path, api_key="s3cret") as live:
        url = live.base_url
        for resp in (httpx.get(f"{url}/v1/models"),
                     httpx.post(f"{url}/v1/chat/completions", json=CHAT),
                     httpx.post(f"{url}/v1/completions", json={"prompt": "x"}),
                     httpx.post(f"{url}/v1/feedback", json={"completion_id": "x", "rating": 1}),
                     httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})):
            assert resp.status_code == 401
            assert resp.json()["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{url}/v1/models", headers=auth).status_code == 200
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
        for open_path in ("/health", "/ready", "/metrics"):
            assert httpx.get(f"{url}{open_path}").status_code == 200
        assert sample(url, "toolkit_requests_total", endpoint="models", status="401") == 2


def test_metrics_rise_by_exactly_n(gateway):
    url = gateway.base_url
    labels = {"model": "fake-model", "engine": "fake"}
    before = {
        "ok": sample(url, "toolkit_requests_total", endpoint="chat", status="200", **labels),
        "bad": sample(url, "toolkit_requests_total", endpoint="chat", status="400", **labels),
        "gen": sample(url, "toolkit_generation_tokens_total", **labels),
        "prompt": sample(url, "toolkit_prompt_tokens_total", **labels),
        "ttft": sample(url, "toolkit_time_to_first_token_seconds_count", **labels),
        "tpot": sample(url, "toolkit_time_per_output_token_seconds_count", **labels),
        "dur": sample(url, "toolkit_request_duration_seconds_count", endpoint="chat", **labels),
    }
    n = 5
    for i in range(n):
        stream = i % 2 == 0
        resp = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": stream})
        assert resp.status_code == 200
    httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "temperature": 9})
    assert sample(url, "toolkit_requests_total", endpoint="chat", status="200", **labels) == before["ok"] + n
    assert sample(url, "toolkit_requests_total", endpoint="chat", status="400", **labels) == before["bad"] + 1
    assert sample(url, "toolkit_generation_tokens_total", **labels) == before["gen"] + 3 * n
    assert sample(url, "toolkit_prompt_tokens_total", **labels) == before["prompt"] + 2 * n
    assert sample(url, "toolkit_time_to_first_token_seconds_count", **labels) == before["ttft"] + n
    assert sample(url, "toolkit_time_per_output_token_seconds_count", **labels) == before["tpot"] + n
    assert sample(url, "toolkit_request_duration_seconds_count", endpoint="chat", **labels) == before["dur"] + n + 1
    httpx.get(f"{url}/v1/models")
    assert sample(url, "toolkit_requests_total", endpoint="models", status="200", **labels) >= 1
    info = sample(url, "toolkit_model_info", model="fake-model", format="merged",
                  quantization="none", engine="fake")
    assert info == 1


def test_metrics_expose_exactly_the_contract(gateway):
    httpx.post(f"{gateway.base_url}/v1/chat/completions", json=CHAT)
    text = httpx.get(f"{gateway.base_url}/metrics").text
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    expected = exposed_series_names()
    assert names <= expected
    assert "toolkit_requests_total" in names and "process_cpu_seconds_total" in names


def test_queue_limits_and_429(tmp_path):
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    with make_gateway(tmp_path, engine, max_concurrency=2, max_queue=2, retry_after_s=3) as live:
        url = live.base_url
        labels = {"model": "fake-model", "engine": "fake"}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(httpx.post, f"{url}/v1/chat/completions", json=CHAT, timeout=30)
                       for _ in range(4)]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and sample(url, "toolkit_requests_waiting", **labels) < 2:
                time.sleep(0.02)
            assert sample(url, "toolkit_requests_running", **labels) == 2
            assert sample(url, "toolkit_requests_waiting", **labels) == 2
            rejected = [httpx.post(f"{url}/v1/chat/completions", json=CHAT) for _ in range(2)]
            for resp in rejected:
                assert resp.status_code == 429
                assert resp.headers["retry-after"] == "3"
                assert resp.json()["error"]["type"] == "rate_limit_error"
            # feedback and models are not queued
            assert httpx.get(f"{url}/v1/models").status_code == 200
            gate.set()
            assert [f.result().status_code for f in futures] == [200] * 4
        assert sample(url, "toolkit_requests_running", **labels) == 0
        assert sample(url, "toolkit_requests_waiting", **labels) == 0
        assert sample(url, "toolkit_requests_total", endpoint="chat", status="429", **labels) == 2


def test_client_disconnect_mid_stream_frees_the_slot(tmp_path):
    engine = FakeEngine(max_model_len=4096, delay_s=0.02)
    with make_gateway(tmp_path, engine, max_concurrency=1, max_queue=0) as live:
        url = live.base_url
        long = {"messages": [{"role": "user", "content": "word " * 1000}], "stream": True}
        with (httpx.Client(timeout=10) as client,
              client.stream("POST", f"{url}/v1/chat/completions", json=long) as resp):
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            assert next(l for l in lines if '"content"' in l)
        # leaving the block closes the connection mid-stream
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and engine.cancelled < 1:
            time.sleep(0.02)
        assert engine.cancelled == 1 and engine.active == 0
        resp = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10)
        assert resp.status_code == 200  # the only slot was given back
        labels = {"model": "fake-model", "engine": "fake"}
        assert sample(url, "toolkit_requests_running", **labels) == 0
        assert sample(url, "toolkit_requests_total", endpoint="chat", status="499", **labels) == 1


@pytest.mark.parametrize("chat", [True, False])
def test_pre_encoded_text_events_equal_the_dict_encoding(chat):
    """The per-stream encoder must emit exactly the event json.dumps builds from the dict,
    whatever the text (quotes, escapes, line separators, the encoder's own placeholder) and
    even with that placeholder in the model name."""
    from toolkit.serve.protocol import TextChunks, chat_chunk, completion_chunk, sse

    model = 'odd "model" \ufdd0 name'
    encoder = TextChunks("chatcmpl-7", 1700000000, model, chat)
    for text in ["a", ' "quoted"\n', "\\", "é\u2028\u2029", "\ufdd0", "\x00\t", "😀"]:
        expected = sse(chat_chunk("chatcmpl-7", 1700000000, model, {"content": text}) if chat
                       else completion_chunk("chatcmpl-7", 1700000000, model, text))
        assert encoder.event(text) == expected
        assert json.loads(encoder.event(text)[6:])["choices"][0][
            "delta" if chat else "text"] == ({"content": text} if chat else text)


def test_gateway_runs_on_httptools_and_uvloop(gateway):
    """The locked venv carries the C HTTP parser and libuv loop, and uvicorn picks them: every
    streamed token passes through both, on the cores the decode threads need."""
    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    config = gateway.server.config
    assert config.http_protocol_class is HttpToolsProtocol
    loop = config.get_loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
