"""Hostile clients against a live gateway on the tiny model: nothing stalls others, nothing 500s.

Issue 12 items 1, 2, 3, 8 and 10: unbounded stop strings, huge bodies and tokenization on the
event loop, bodies that crashed a layer (negative seed, 5,000-digit integers, deep nesting,
lone surrogates), parameters accepted but ignored, and 500s that dropped keep-alive silently.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import statistics
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client import CollectorRegistry

from tests.serve_helpers import FakeEngine, live_gateway, serve_app
from toolkit.feedback.store import FeedbackStore
from toolkit.monitoring.metrics import GatewayMetrics
from toolkit.serve import ServeSettings
from toolkit.serve.app import build_app
from toolkit.serve.body import MAX_JSON_DEPTH
from toolkit.serve.engines.batching import TextStream
from toolkit.serve.protocol import MAX_STOP_CHARS

MESSAGES = [{"role": "user", "content": "the patient"}]
GREEDY = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0}
MAX_BODY = 1024 * 1024  # the default of ServeSettings.max_body_bytes


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    with live_gateway(tiny_model_dir, model_name="tiny", max_concurrency=4, max_queue=8,
                      threads=1) as live:
        yield live


def post(url: str, body: bytes | dict, path: str = "/v1/chat/completions",
         timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, timeout=timeout,
                      headers={"content-type": "application/json"})


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None,
                        code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text[:300]
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def health_seconds(url: str) -> float:
    """One GET /health on a fresh raw socket.

    httpx's own round trip on loopback adds a constant ~40 ms (delayed ACK), which would eat
    most of a 100 ms budget; a raw request with `Connection: close` measures the server alone.
    """
    parts = urlsplit(url)
    started = time.perf_counter()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    elapsed = time.perf_counter() - started
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    return elapsed


# item 1: stop strings


def test_huge_stop_strings_are_400(tiny):
    stops = ["x" * 200_000 + str(i) for i in range(4)]
    assert_openai_error(post(tiny.base_url, {**GREEDY, "stop": stops}), 400, param="stop")
    longest = ["x" * (MAX_STOP_CHARS - 1) + str(i) for i in range(4)]
    assert post(tiny.base_url, {**GREEDY, "stop": longest}).status_code == 200


def _naive_push(text: str, stops: list[str], sent: str, final: bool) -> tuple[str, bool, str]:
    """The quadratic reference the matcher replaced (first stop in list order wins)."""
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            return text[:at][len(sent):], True, text[:at]
    if not final:
        hold = max((n for stop in stops for n in range(1, len(stop))
                    if text.endswith(stop[:n])), default=0)
        text = text[:len(text) - hold]
    return text[len(sent):], False, text


def test_stop_matcher_agrees_with_the_naive_check():
    import random

    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5)))
                 for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("abc") for _ in range(30))
        stream = TextStream(lambda ids, text=text: "".join(text[i] for i in ids), stops)
        sent = ""
        for n in range(1, len(text) + 1):
            final = n == len(text)
            delta, stopped, shown = _naive_push(text[:n], stops, sent, final)
            assert stream.push(list(range(n)), final) == (delta, stopped), (stops, text, n)
            sent = shown if shown.startswith(sent) else sent
            if stopped:
                break


def test_stop_matching_is_linear_in_the_stop_length():
    """Four 50k-character stops that every token keeps half-matching ("aaa..." vs "a...ab").

    The old per-token check copied every prefix of every stop (~1 s per token here); the
    automata build once (~0.1 s) and then read one character per token. The loop gives up at
    a deadline so the old code fails in seconds rather than minutes.
    """
    stops = ["a" * 49_999 + "b" + str(i) for i in range(4)]
    stream = TextStream(lambda ids: "a" * len(ids), stops)
    started = time.perf_counter()
    pushed = 0
    for n in range(1, 401):
        if time.perf_counter() - started > 3.0:
            break
        stream.push(list(range(n)), final=False)
        pushed = n
    assert pushed == 400, f"only {pushed} tokens in 3 s"
    assert stream.sent == ""  # all 400 characters may still start a stop: held back


# item 2: body size, tokenization off the loop


def test_body_over_the_limit_is_413(tiny):
    content = "w" * (MAX_BODY + 1024)
    resp = post(tiny.base_url, {"messages": [{"role": "user", "content": content}]})
    assert_openai_error(resp, 413, code="request_too_large")
    assert resp.headers["connection"] == "close"

    def chunks():  # no Content-Length: refused while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"w" * 65536
        yield b'"}]}'

    resp = httpx.post(f"{tiny.base_url}/v1/chat/completions", content=chunks(), timeout=60,
                      headers={"content-type": "application/json"})
    assert_openai_error(resp, 413, code="request_too_large")
    assert httpx.get(f"{tiny.base_url}/health").status_code == 200


def test_settings_and_cli_take_max_body_bytes():
    from typer.testing import CliRunner

    from toolkit.cli import app

    assert ServeSettings(model="m").max_body_bytes == MAX_BODY
    assert ServeSettings(model="m", max_body_bytes=4096).max_body_bytes == 4096
    help_text = CliRunner().invoke(app, ["serve", "--help"],
                                   env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"}).output
    assert "--max-body-bytes" in help_text


def test_a_flood_of_large_allowed_bodies_does_not_block_health(tiny):
    """Sixteen ~0.9 MB prompts (allowed, over the context) at once; /health stays fast.

    Before, each was tokenized on the event loop (~1 s each) while /health waited. Now a
    prompt that cannot fit is refused from its length, and any tokenization runs in a worker
    thread holding an admission slot, so the excess gets 429.
    """
    url = tiny.base_url
    big = json.dumps({"messages": [{"role": "user", "content": "word " * 180_000}]}).encode()
    assert len(big) < MAX_BODY
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, url, big) for _ in range(16)]
        probes = []
        while not all(f.done() for f in futures) and len(probes) < 200:
            probes.append(health_seconds(url))
            time.sleep(0.01)
        statuses = [f.result().status_code for f in futures]
    assert set(statuses) <= {400, 429}, statuses
    assert probes, "the flood ended before the first probe"
    # median: what every client sees; max with slack for a 2-core machine shared with other
    # jobs (the blocked loop took seconds, far above either bound)
    assert statistics.median(probes) < 0.1 and max(probes) < 0.5, probes


def test_prompt_over_the_context_is_refused_before_tokenizing(tiny, monkeypatch):
    engine = tiny.app.state.gateway.engine
    rendered = []
    render = engine.render
    monkeypatch.setattr(engine, "render", lambda request: rendered.append(1) or render(request))
    resp = post(tiny.base_url, {"messages": [{"role": "user", "content": "word " * 100_000}]})
    assert_openai_error(resp, 400, param="messages", code="context_length_exceeded")
    assert rendered == []
    assert post(tiny.base_url, GREEDY).status_code == 200 and rendered == [1]


# item 3: bodies that crashed a layer


@pytest.mark.parametrize("stream", [False, True])
def test_negative_seed_is_400(tiny, stream):
    resp = post(tiny.base_url, {**GREEDY, "seed": -1, "stream": stream})
    assert_openai_error(resp, 400, param="seed")


def test_huge_integer_literal_is_400(tiny):
    huge = "9" * 5000
    body = f'{{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": {huge}}}'
    assert_openai_error(post(tiny.base_url, body.encode()), 400, param="max_tokens")
    body = f'{{"messages": [{{"role": "user", "content": "hi"}}], "extra": [1, {huge}]}}'
    assert_openai_error(post(tiny.base_url, body.encode()), 400, param="extra.1")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/feedback"])
@pytest.mark.parametrize("depth", [1000, MAX_JSON_DEPTH + 10])
def test_deep_nesting_is_400(tiny, path, depth):
    nested = "[" * depth + "]" * depth
    body = f'{{"messages": [{{"role": "user", "content": "hi"}}], "completion_id": "x", ' \
           f'"rating": 1, "x": {nested}}}'
    error = assert_openai_error(post(tiny.base_url, body.encode(), path), 400,
                                code="nesting_too_deep")
    if depth < 900:  # json itself parses it; the walk names the field
        assert error["param"] == "x"


def test_lone_surrogate_is_400(tiny):
    body = json.dumps({"messages": [{"role": "user", "content": "a\ud800b"}]}).encode()
    assert b"\\ud800" in body
    assert_openai_error(post(tiny.base_url, body), 400, param="messages.0.content")
    body = json.dumps({"prompt": "\udfff", "max_tokens": 2}).encode()
    assert_openai_error(post(tiny.base_url, body, "/v1/completions"), 400, param="prompt")
    # what the byte-level checks must let through: an escaped pair (an emoji), a literal
    # backslash before "ud800", brackets inside a string
    for text in ("\U0001F600", "\\ud800", "[{" * 100):
        body = json.dumps({"prompt": text, "max_tokens": 2}).encode()
        assert post(tiny.base_url, body, "/v1/completions").status_code == 200, text


# item 10: parameters accepted but not honoured; strict integers; top_p 0


UNSUPPORTED = [
    ("/v1/chat/completions", "logprobs", True),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "required"),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "echo", True),
    ("/v1/completions", "echo", True),
    ("/v1/completions", "logprobs", 0),
]
HARMLESS = [
    ("/v1/chat/completions", "logprobs", False),
    ("/v1/chat/completions", "tool_choice", "none"),
    ("/v1/chat/completions", "response_format", {"type": "text"}),
    ("/v1/completions", "echo", False),
]


@pytest.mark.parametrize("path,name,value", UNSUPPORTED)
def test_unhonoured_parameter_is_400(tiny, path, name, value):
    body = {"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": "hi"}
    resp = post(tiny.base_url, {**body, "max_tokens": 2, name: value}, path)
    assert_openai_error(resp, 400, param=name, code="unsupported_parameter")


@pytest.mark.parametrize("path,name,value", HARMLESS)
def test_harmless_values_stay_accepted(tiny, path, name, value):
    body = {"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": "hi"}
    assert post(tiny.base_url, {**body, "max_tokens": 2, name: value}, path).status_code == 200


@pytest.mark.parametrize("name,value", [("max_tokens", True), ("max_tokens", 2.0),
                                        ("seed", True), ("temperature", True)])
def test_integer_and_number_fields_refuse_booleans(tiny, name, value):
    assert_openai_error(post(tiny.base_url, {"messages": MESSAGES, name: value}), 400, param=name)


def test_top_p_zero_is_greedy(tiny):
    greedy = post(tiny.base_url, GREEDY).json()["choices"][0]["message"]["content"]
    resp = post(tiny.base_url, {**GREEDY, "temperature": 1.0, "top_p": 0, "seed": 5})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == greedy


# item 8: a 500 says it closes the connection


class _BrokenEngine(FakeEngine):
    def prepare(self, request):
        raise ZeroDivisionError("a bug")


def test_unexpected_500_closes_the_connection(tmp_path: Path):
    config = ServeSettings(model="fake", feedback_db=tmp_path / "feedback.db")
    app = build_app(config, _BrokenEngine(), GatewayMetrics(CollectorRegistry()),
                    FeedbackStore(config.feedback_db))
    with serve_app(app) as live, httpx.Client(base_url=live.base_url, timeout=10) as client:
        resp = client.post("/v1/chat/completions", json={"messages": MESSAGES})
        assert_openai_error(resp, 500)
        assert resp.headers["connection"] == "close"
        assert client.get("/health").status_code == 200  # the client reconnects cleanly


# all at once


def _hostile_bodies() -> list[tuple[str, bytes]]:
    chat = "/v1/chat/completions"
    stops = {**GREEDY, "stop": ["x" * (MAX_STOP_CHARS - 1) + str(i) for i in range(4)]}
    deep = "[" * 1000 + "]" * 1000
    return [
        (chat, json.dumps({**GREEDY, "stop": ["x" * 200_000 + str(i) for i in range(4)]}).encode()),
        (chat, json.dumps(stops).encode()),
        (chat, json.dumps({"messages": [{"role": "user", "content": "word " * 180_000}]}).encode()),
        (chat, json.dumps({"messages": [{"role": "user", "content": "w" * 2 * MAX_BODY}]}).encode()),
        (chat, f'{{"messages": [], "x": {deep}}}'.encode()),
        ("/v1/feedback", f'{{"completion_id": "x", "rating": {deep}}}'.encode()),
        (chat, json.dumps({**GREEDY, "seed": -3}).encode()),
        (chat, json.dumps({**GREEDY, "seed": -3, "stream": True}).encode()),
        (chat, f'{{"messages": [], "seed": {"7" * 5000}}}'.encode()),
        (chat, json.dumps({"messages": [{"role": "user", "content": "\ud800"}]}).encode()),
    ]


def test_attack_while_a_well_behaved_client_runs(tiny):
    url = tiny.base_url

    def greedy_seconds() -> tuple[float, str]:
        started = time.perf_counter()
        resp = post(url, GREEDY)
        assert resp.status_code == 200, resp.text
        return time.perf_counter() - started, resp.json()["choices"][0]["message"]["content"]

    quiet = [greedy_seconds() for _ in range(3)]
    bodies = _hostile_bodies()
    measuring = threading.Event()
    done = threading.Event()
    statuses: list[int] = []
    during: list[int] = []

    def attacker(offset: int) -> None:
        for i in range(60):  # bounded even if the measurement hangs
            if done.is_set():
                return
            path, body = bodies[(offset + i) % len(bodies)]
            try:
                code = post(url, body, path).status_code
            except httpx.TransportError:  # a 413 may close the socket while the body is sent
                code = 413
            statuses.append(code)
            if measuring.is_set():
                during.append(code)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        attackers = [pool.submit(attacker, k) for k in range(4)]
        time.sleep(0.3)  # the attack is under way
        measuring.set()
        probes = []
        for _ in range(10):
            probes.append(health_seconds(url))
            time.sleep(0.02)
        loaded = [greedy_seconds() for _ in range(5)]
        measuring.clear()
        done.set()
        for future in attackers:
            future.result()
    after = [greedy_seconds() for _ in range(3)]

    assert len(during) >= 4, "the attack did not overlap the measurement"
    assert [s for s in statuses if s >= 500] == []
    assert statistics.median(probes) < 0.1 and max(probes) < 0.5, probes
    # the quiet reference is the slower of the times before and after the attack: this VM's
    # speed drifts by tens of percent over a minute, and other jobs may start mid-test
    quiet_s = max(statistics.median(t for t, _ in quiet), statistics.median(t for t, _ in after))
    loaded_s = statistics.median(t for t, _ in loaded)
    # 2x the quiet time, plus 0.3 s: on 2 cores shared with the attackers' own client threads
    # (building and sending megabyte bodies) and other jobs, the OS scheduler alone can delay
    # a 0.1 s request by a few time slices; a stalled decode thread or event loop costs seconds
    assert loaded_s < 2 * quiet_s + 0.3, (quiet, loaded, after)
    # greedy answers unchanged
    assert {text for _, text in quiet + loaded + after} == {quiet[0][1]}
    assert health_seconds(url) < 1.0 and post(url, GREEDY).status_code == 200
