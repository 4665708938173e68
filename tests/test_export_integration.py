"""The embedded SmolLM2 end to end: a 1-step training run exported to `merged` and `onnx-int8`
from the CLI, as a user types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _toolkit(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.integration
def test_smollm2_run_exports_merged_and_onnx_int8(tmp_path: Path,
                                                   embedded_model_dir: Path) -> None:
    from toolkit.export import ExportFormat, load_export
    from toolkit.export.registry import unavailable_reason

    if not (REPO_ROOT / "data" / "train.jsonl").is_file():
        pytest.skip("data/train.jsonl is missing: the training data set is not in this checkout")
    reason = unavailable_reason(ExportFormat.onnx_int8)
    if reason:
        pytest.skip(f"onnx-int8 cannot be produced here: {reason}")
    run, out = tmp_path / "run", tmp_path / "exports"
    trained = _toolkit("train", "--config", "configs/model/smollm2-135m.yaml",
                       "training.max_steps=1", "training.max_seq_len=128", "--output", str(run))
    assert trained.returncode == 0, trained.stderr[-3000:]

    exported = _toolkit("export", str(run), "--quantize", "merged", "--quantize", "onnx-int8",
                        "--out", str(out))
    assert exported.returncode == 0, (exported.stdout + exported.stderr)[-4000:]
    for header in ("vs fp16", "Δ ppl", "tok/s"):
        assert header in exported.stdout
    merged = json.loads((out / "merged" / "export_report.json").read_text())
    onnx = json.loads((out / "onnx-int8" / "export_report.json").read_text())
    assert merged["verification"]["passed"]
    assert merged["verification"]["max_abs_logit_diff"] <= merged["verification"]["tolerance"]
    assert merged["max_model_len"] == 8192 and merged["dtype"] == "float16"
    assert 15 < merged["perplexity"]["overall"] < 60
    assert set(merged["perplexity"]["by_language"]) == {"fr", "en"}
    assert onnx["verification"]["passed"] and onnx["engine_hint"] == ["onnxruntime"]
    # A correctness margin, not the +2 % product target (benchmarks/export_quality.py reports
    # that): a 1-step run measured +1.2..2.1 % on AVX512/AMX CPUs, while a broken int8 path
    # (ORT's dynamic per-tensor int8, a wrong rope_theta) lands at +9..112 %.
    for part in ("overall", "fr", "en"):
        assert abs(onnx["perplexity_delta_pct"][part]) <= 6.0, onnx["perplexity_delta_pct"]
    assert onnx["calibration"]["by_language"] == {"en": 21, "fr": 35}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    loaded = load_export(out / "onnx-int8", threads=1)
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Quelles sont les étapes de l'hygiène des mains ?"}],
        tokenize=False, add_generation_prompt=True)
    reply = loaded.generate(loaded.tokenizer(text, add_special_tokens=False)["input_ids"], 12)
    assert 0 < len(reply) <= 12
