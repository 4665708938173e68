"""`toolkit train` from the command line on the embedded SmolLM2-135M (a few steps)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_cli_trains_smollm2_for_two_steps(tmp_path: Path, embedded_model_dir: Path) -> None:
    held_out = tmp_path / "test-small.jsonl"
    lines = (REPO_ROOT / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    by_language = {lang: [line for line in lines if json.loads(line)["language"] == lang][:3]
                   for lang in ("fr", "en")}
    held_out.write_text("\n".join(by_language["fr"] + by_language["en"]) + "\n", encoding="utf-8")
    out = tmp_path / "runs" / "smollm2"
    command = [
        str(Path(sys.executable).with_name("toolkit")), "train",
        "--config", "configs/model/smollm2-135m.yaml", "--eval-data", str(held_out),
        "--output", str(out),
        "training.max_steps=2", "training.max_seq_len=192", "training.batch_size=2",
        "training.grad_accum=1", "training.threads=2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOOLKIT_NO_PROGRESS": "1"}
    done = subprocess.run(command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "training summary" in done.stdout and "perplexity fr" in done.stdout
    assert "truncated at 192" in done.stdout  # reported, never silent

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 2
    assert manifest["base_model"]["source"] == "embedded:smollm2-135m"
    assert manifest["base_model"]["kind"] == "embedded"
    assert manifest["truncated_examples"] > 0
    for phase in ("before", "after"):
        metrics = manifest["metrics"][phase]
        assert math.isfinite(metrics["overall"]) and set(metrics["by_language"]) == {"fr", "en"}
    assert manifest["data"]["train"]["examples"] == 56

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    assert tokenizer.chat_template
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_model_dir),
                                      out / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())
