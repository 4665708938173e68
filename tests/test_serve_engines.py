"""The embedded engines on the tiny model: batched decoding equals one-by-one decoding, sampling
controls, stop strings, LoRA runs, ONNX Runtime, and the official openai client end to end."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.artifact_builders import save_lora_adapter, write_run_manifest
from tests.serve_helpers import live_gateway
from toolkit.artifacts import ADAPTER_DIR
from toolkit.runtime.steps import sample_token
from toolkit.serve.engines.batching import TextStream

PROMPTS = ["Bonjour le monde", "the patient has a fever and", "x",
           "Quelle est la procédure en cas de chute ?"]


@pytest.fixture(scope="module")
def torch_backend(tiny_model_dir):
    from toolkit.runtime.torch_steps import TorchStepBackend
    from toolkit.serve.engines.transformers_engine import load_transformers

    tokenizer, model = load_transformers(tiny_model_dir, None, None)
    return tokenizer, TorchStepBackend(model, tokenizer.pad_token_id)


def _solo_logits(backend, prompt: list[int], steps: list[int]) -> list[np.ndarray]:
    state, logits = backend.prefill([prompt])
    out = [logits[0]]
    for token in steps:
        state, logits = backend.decode(state, np.array([token]))
        out.append(logits[0])
    return out


def check_batched_equals_solo(tokenizer, backend, atol: float) -> None:
    """Prefill two prompts, merge a third in mid-way, drop one: logits match solo decoding."""
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    forced = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17]]
    solo = [_solo_logits(backend, p, f) for p, f in zip(ids, forced)]
    state, logits = backend.prefill(ids[:2])
    np.testing.assert_allclose(logits, np.stack([solo[0][0], solo[1][0]]), atol=atol)
    state, logits = backend.decode(state, np.array([forced[0][0], forced[1][0]]))
    np.testing.assert_allclose(logits[1], solo[1][1], atol=atol)
    new_state, new_logits = backend.prefill([ids[2]])  # arrives at a step boundary
    np.testing.assert_allclose(new_logits[0], solo[2][0], atol=atol)
    state = backend.merge(state, new_state)
    state, logits = backend.decode(state, np.array([forced[0][1], forced[1][1], forced[2][0]]))
    for row, (seq, step) in enumerate([(0, 2), (1, 2), (2, 1)]):
        np.testing.assert_allclose(logits[row], solo[seq][step], atol=atol)
    state = backend.select(state, [1, 2])  # the first request leaves
    state, logits = backend.decode(state, np.array([forced[1][2], forced[2][1]]))
    np.testing.assert_allclose(logits[0], solo[1][3], atol=atol)
    np.testing.assert_allclose(logits[1], solo[2][2], atol=atol)


def test_torch_batched_decoding_matches_solo(torch_backend):
    tokenizer, backend = torch_backend
    check_batched_equals_solo(tokenizer, backend, atol=1e-4)


def test_text_stream_holds_back_stop_prefixes():
    words = ["Hello", " wor", "ld", " STO", "P", " after"]
    stream = TextStream(lambda ids: "".join(words[i] for i in ids), ["STOP"])
    assert stream.push([0], final=False) == ("Hello", False)
    assert stream.push([0, 1], final=False) == (" wor", False)
    assert stream.push([0, 1, 2, 3], final=False) == ("ld ", False)  # "STO" held back
    assert stream.push([0, 1, 2, 3, 4], final=False) == ("", True)  # cut at the stop string
    plain = TextStream(lambda ids: "ab\ufffd"[: len(ids)], [])
    assert plain.push([0, 1, 2], final=False) == ("ab", False)  # incomplete character held


def test_text_stream_passes_over_stops_until_armed():
    words = ["a", "STOP", "b", "STOP", "c"]
    stream = TextStream(lambda ids: "".join(words[i] for i in ids), ["STOP"])
    assert stream.push([0, 1], final=False, armed=False) == ("aSTOP", False)  # before min_tokens
    assert stream.push([0, 1, 2], final=False) == ("b", False)
    assert stream.push([0, 1, 2, 3], final=False) == ("", True)  # the next one ends the text
    assert stream.sent == "aSTOPb"


def test_sample_token():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 5.0, 1.0, 4.9])
    assert sample_token(logits, 0.0, 1.0, rng) == 1
    assert sample_token(logits, 1.0, 1e-6, rng) == 1  # top_p that small keeps only the top
    draws = {sample_token(logits, 1.0, 1.0, np.random.default_rng(s)) for s in range(50)}
    assert draws >= {1, 3}
    same = [sample_token(logits, 1.0, 0.9, np.random.default_rng(7)) for _ in range(2)]
    assert same[0] == same[1]


@pytest.fixture(scope="module")
def tiny_gateway(tiny_model_dir):
    with live_gateway(tiny_model_dir, model_name="tiny", max_concurrency=8, threads=1) as live:
        yield live


def chat(url: str, content: str, **extra) -> dict:
    resp = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": content}], **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_openai_client_chat_stream_completions(tiny_gateway):
    from openai import OpenAI

    client = OpenAI(base_url=f"{tiny_gateway.base_url}/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Bonjour"}], max_tokens=6, temperature=0)
    assert answer.id.startswith("chatcmpl-") and answer.usage.completion_tokens <= 6
    assert answer.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Bonjour"}], max_tokens=6,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content  # greedy: streamed == whole
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    completion = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, seed=3)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens >= 1


def test_concurrent_greedy_equals_sequential(tiny_gateway):
    url = tiny_gateway.base_url
    solo = [chat(url, p, max_tokens=12, temperature=0)["choices"][0]["message"]["content"]
            for p in PROMPTS]
    scheduler = tiny_gateway.app.state.gateway.engine.scheduler
    before = scheduler.stats.max_rows
    counted = httpx.get(f"{url}/ready").json()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: chat(url, p, max_tokens=12, temperature=0), PROMPTS * 2))
    assert [r["choices"][0]["message"]["content"] for r in together] == solo * 2
    assert max(before, scheduler.stats.max_rows) >= 2  # requests really shared decode steps
    # /ready's batching counters: what benchmarks/gateway_overhead.py compares across sides
    after = httpx.get(f"{url}/ready").json()
    steps = after["steps"] - counted["steps"]
    answered = sum(r["usage"]["completion_tokens"] for r in together)
    assert 1 <= after["prefills"] - counted["prefills"] <= len(together)
    # every token but each request's first (from its prefill) came from a decode step's row
    assert after["rows_decoded"] - counted["rows_decoded"] >= answered - len(together)
    assert steps < answered - len(together)  # rows shared steps
    assert after["decode_s"] > counted["decode_s"] and after["prefill_s"] > counted["prefill_s"]


def test_seed_makes_sampling_reproducible(tiny_gateway):
    url = tiny_gateway.base_url
    runs = [chat(url, "Hello", max_tokens=10, temperature=1.0, top_p=0.9, seed=42)
            for _ in range(2)]
    assert runs[0]["choices"][0]["message"] == runs[1]["choices"][0]["message"]


def test_max_tokens_and_stop_strings(tiny_gateway):
    url = tiny_gateway.base_url
    greedy = chat(url, "the patient", max_tokens=16, temperature=0)
    text, usage = greedy["choices"][0]["message"]["content"], greedy["usage"]
    if greedy["choices"][0]["finish_reason"] == "length":
        assert usage["completion_tokens"] == 16
    assert usage["completion_tokens"] <= 16
    if len(text) < 6:
        pytest.skip("the random model answered too briefly to pick a stop string")
    stop = text[3:6]
    cut = chat(url, "the patient", max_tokens=16, temperature=0, stop=[stop])
    assert cut["choices"][0]["message"]["content"] == text[: text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


@contextlib.contextmanager
def every_token_is_eos(live):
    """Make every token end the answer, so only ignore_eos/min_tokens can lengthen it."""
    scheduler = live.app.state.gateway.engine.scheduler
    before = scheduler.eos_ids
    scheduler.eos_ids = frozenset(range(live.app.state.gateway.engine.tokenizer.vocab_size + 512))
    try:
        yield
    finally:
        scheduler.eos_ids = before


def test_ignore_eos_and_min_tokens(tiny_gateway):
    url = tiny_gateway.base_url
    with every_token_is_eos(tiny_gateway):
        plain = chat(url, "the patient", max_tokens=9, temperature=0)
        assert plain["usage"]["completion_tokens"] == 1  # the EOS itself, as vLLM counts it
        assert plain["choices"][0]["finish_reason"] == "stop"
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            long = list(pool.map(lambda p: chat(url, p, max_tokens=9, temperature=0,
                                                ignore_eos=True), PROMPTS))
        assert [a["usage"]["completion_tokens"] for a in long] == [9] * len(PROMPTS)
        assert {a["choices"][0]["finish_reason"] for a in long} == {"length"}
        with httpx.stream("POST", f"{url}/v1/completions", json={
                "prompt": "Hello", "max_tokens": 7, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}) as resp:
            events = [e for e in resp.read().decode().split("\n\n") if e.startswith("data: {")]
        assert json.loads(events[-1][6:])["usage"]["completion_tokens"] == 7
        at_least = chat(url, "the patient", max_tokens=9, temperature=0, min_tokens=4)
        assert at_least["usage"]["completion_tokens"] == 5  # 4 tokens, then the EOS
        assert at_least["choices"][0]["finish_reason"] == "stop"


def test_stop_strings_wait_for_min_tokens(tiny_gateway):
    url = tiny_gateway.base_url
    greedy = chat(url, "the patient", max_tokens=16, temperature=0, ignore_eos=True)
    text = greedy["choices"][0]["message"]["content"]
    if len(text) < 6:
        pytest.skip("the random model answered too briefly to pick a stop string")
    stop = text[1:3]
    assert chat(url, "the patient", max_tokens=16, temperature=0, ignore_eos=True,
                stop=[stop])["usage"]["completion_tokens"] < 16
    late = chat(url, "the patient", max_tokens=16, temperature=0, ignore_eos=True, stop=[stop],
                min_tokens=16)
    # armed at the 16th token, the stop may still cut the text there (as in vLLM)
    assert late["usage"]["completion_tokens"] == 16
    assert text.startswith(late["choices"][0]["message"]["content"])
    assert len(late["choices"][0]["message"]["content"]) > text.find(stop)


def test_min_tokens_over_the_default_limit(tiny_gateway):
    resp = httpx.post(f"{tiny_gateway.base_url}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}], "min_tokens": 5000})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "min_tokens"


def test_context_limit(tiny_gateway):
    resp = httpx.post(f"{tiny_gateway.base_url}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"


def test_stream_disconnect_cancels_decoding(tiny_gateway):
    check_disconnect_leaves_the_batch(tiny_gateway.base_url,
                                      tiny_gateway.app.state.gateway.engine.scheduler)


def check_disconnect_leaves_the_batch(url: str, scheduler: Any) -> None:
    """A client that reads one chunk of a long stream and leaves: its row leaves the batch."""
    import time

    request = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 900,
               "temperature": 0, "stream": True}
    with (httpx.Client(timeout=30) as client,
          client.stream("POST", f"{url}/v1/chat/completions", json=request) as resp):
        next(resp.iter_lines())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (scheduler._active or scheduler._pending):
        time.sleep(0.02)
    assert not scheduler._active and not scheduler._pending


def make_lora_run(root: Path, base: Path) -> Path:
    """A run folder as training leaves it (adapter r4, manifest through its writer)."""
    run = root / "triage"
    save_lora_adapter(base, run / ADAPTER_DIR, r=4, alpha=8)
    write_run_manifest(run, base, r=4, alpha=8)
    return run


def test_training_run_is_served_with_its_adapter(tmp_path, tiny_model_dir):
    import torch

    from toolkit.serve.engines.transformers_engine import load_transformers
    from toolkit.serve.select import resolve_served_model

    run = make_lora_run(tmp_path, tiny_model_dir)
    served = resolve_served_model(str(run))
    assert served.kind == "run" and served.adapter == (run / ADAPTER_DIR).resolve()
    # what the engine loads for the run is the base with the adapter in it, not the bare base
    _, tuned = load_transformers(served.path, served.adapter, served.tokenizer_dir)
    _, base = load_transformers(served.path, None, None)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.inference_mode():
        shift = (tuned(input_ids=ids).logits - base(input_ids=ids).logits).abs().max()
    assert float(shift) > 1e-2
    with live_gateway(run, max_concurrency=2) as live:
        models = httpx.get(f"{live.base_url}/v1/models").json()["data"]
        assert models[0]["id"] == "triage" and models[0]["format"] == "lora"
        answer = chat(live.base_url, "Bonjour", max_tokens=5, temperature=0)
        assert answer["usage"]["completion_tokens"] <= 5


def test_onnx_batched_decoding_matches_solo_and_torch(tiny_onnx_dir, torch_backend):
    from toolkit.runtime.onnx_model import OnnxCausalLM
    from toolkit.runtime.onnx_steps import OrtStepBackend

    tokenizer, torch_be = torch_backend
    backend = OrtStepBackend(OnnxCausalLM.from_dir(tiny_onnx_dir, threads=1))
    check_batched_equals_solo(tokenizer, backend, atol=1e-4)
    ids = tokenizer(PROMPTS[1])["input_ids"]
    np.testing.assert_allclose(backend.prefill([ids])[1], torch_be.prefill([ids])[1], atol=1e-3)


def test_onnx_export_served_by_auto_engine(tiny_onnx_dir, tiny_gateway, caplog):
    with caplog.at_level("INFO", logger="toolkit.serve"), \
            live_gateway(tiny_onnx_dir, engine="auto", model_name="tiny", threads=1) as live:
        assert live.app.state.gateway.info.engine == "onnxruntime"
        # the served weights were offered to huge pages once loaded (runtime.huge_pages)
        assert any("weights in huge pages" in r.getMessage() for r in caplog.records)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            onnx = list(pool.map(lambda p: chat(live.base_url, p, max_tokens=8, temperature=0),
                                 PROMPTS))
        torch_answers = [chat(tiny_gateway.base_url, p, max_tokens=8, temperature=0) for p in PROMPTS]
        assert [a["choices"][0]["message"] for a in onnx] == \
            [a["choices"][0]["message"] for a in torch_answers]
        with httpx.stream("POST", f"{live.base_url}/v1/completions", json={
                "prompt": "Hello", "max_tokens": 4, "stream": True}) as resp:
            assert resp.read().decode().endswith("data: [DONE]\n\n")
