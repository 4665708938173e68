"""ONNX export (optimum-onnx in .venv-onnx), our ONNX Runtime wrapper and the int8 format.

The tiny model has rope_theta 50000: an export that lost it (transformers 4.x reading a
transformers 5 config) would still run but its logits would not match PyTorch's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from toolkit.errors import MissingExtraError
from toolkit.export.onnx import (
    ONNX_PYTHON_ENV,
    SETUP_COMMAND,
    export_onnx,
    quantize_onnx_int8,
    resolve_onnx_python,
    write_compat_view,
)

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'toolkit[onnx]'")


def _onnx_venv_missing() -> bool:
    try:
        resolve_onnx_python()
    except MissingExtraError:
        return True
    return False


needs_onnx_venv = pytest.mark.skipif(
    _onnx_venv_missing(), reason=f"no ONNX exporter venv (.venv-onnx): run `{SETUP_COMMAND}`"
)


@pytest.fixture(scope="module")
def onnx_export(tiny_onnx_export: tuple[Path, dict]) -> tuple[Path, dict]:
    return tiny_onnx_export


@pytest.fixture(scope="module")
def onnx_model(onnx_export: tuple[Path, dict]):
    from toolkit.runtime.onnx_model import OnnxCausalLM

    return OnnxCausalLM.from_dir(onnx_export[0], threads=1)


@pytest.fixture(scope="module")
def torch_model(tiny_model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.inference_mode():
        kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return model(input_ids=torch.from_numpy(ids), **kwargs).logits.numpy()


def _ids(rng_seed: int, shape: tuple[int, int], vocab: int) -> np.ndarray:
    return np.random.default_rng(rng_seed).integers(3, vocab, shape, dtype=np.int64)


def test_compat_view_lifts_rope_theta_and_leaves_tokenizer_out(tiny_model_dir: Path, tmp_path: Path):
    rope = write_compat_view(tiny_model_dir, tmp_path / "view")
    config = json.loads((tmp_path / "view" / "config.json").read_text())
    assert rope == {"rope_theta": 50000.0, "rope_scaling": None}
    assert config["rope_theta"] == 50000.0 and "rope_parameters" not in config
    assert (tmp_path / "view" / "model.safetensors").is_symlink()
    assert not (tmp_path / "view" / "tokenizer_config.json").exists()


def test_missing_onnx_venv_names_the_setup_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ONNX_PYTHON_ENV, str(tmp_path / "nowhere" / "python"))
    with pytest.raises(MissingExtraError, match="scripts/setup-onnx-venv.sh"):
        export_onnx(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MissingExtraError, match=r"\(onnx_python\) does not exist"):
        resolve_onnx_python(tmp_path / "python")


def test_interpreter_without_optimum_onnx_is_refused(tmp_path: Path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(MissingExtraError, match="has no optimum-onnx: create the exporter venv"):
        resolve_onnx_python(fake)


@needs_onnx_venv
def test_export_writes_external_data_and_original_files(onnx_export, tiny_model_dir: Path):
    out, facts = onnx_export
    assert {"model.onnx", "model.onnx_data", "tokenizer.json", "chat_template.jinja",
            "generation_config.json"} <= set(facts["files"])
    assert (out / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    assert isinstance(facts["opset"], int) and facts["rope"]["rope_theta"] == 50000.0
    assert not any(p.name.endswith(".partial") for p in out.parent.iterdir())


@needs_onnx_venv
def test_logits_match_pytorch(onnx_model, torch_model):
    ids = _ids(0, (2, 24), torch_model.config.vocab_size)
    diff = np.abs(onnx_model.logits(ids) - _torch_logits(torch_model, ids)).max()
    assert diff < 1e-4


@needs_onnx_venv
def test_left_padded_logits_match_unpadded(onnx_model, torch_model):
    ids = _ids(1, (1, 10), torch_model.config.vocab_size)
    padded = np.concatenate([np.zeros((1, 4), np.int64), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 4), np.int64), np.ones((1, 10), np.int64)], axis=1)
    got = onnx_model.logits(padded, mask)[:, 4:]
    assert np.isfinite(got).all()
    assert np.abs(got - onnx_model.logits(ids)).max() < 1e-4


@needs_onnx_venv
def test_greedy_generate_matches_transformers(onnx_model, torch_model):
    import torch

    prompt = [5, 17, 42, 8, 99, 23]
    with torch.inference_mode():
        out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                                   pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    assert onnx_model.generate_all([prompt], 5) == [expected]


@needs_onnx_venv
def test_batched_generate_equals_each_prompt_alone(onnx_model):
    prompts = [[5, 17, 42, 8, 99, 23, 7, 61], [30, 12, 77]]
    together = onnx_model.generate_all(prompts, 6)
    assert together == [onnx_model.generate_all([p], 6)[0] for p in prompts]


@needs_onnx_venv
def test_generate_steps_report_stop_and_length(onnx_model):
    prompts = [[5, 17, 42, 8], [30, 12, 77]]
    first = onnx_model.generate_all([prompts[1]], 1)[0][0]
    steps = list(onnx_model.generate(prompts, 3, eos_token_ids=[first]))
    assert [s.index for s in steps] == [0, 1, 2]
    assert steps[0].tokens[1] == first and steps[0].finish_reasons[1] == "stop"
    assert steps[1].tokens[1] is None and steps[2].finish_reasons == ["length", None]
    stopped = list(onnx_model.generate(prompts, 5, stop_fn=lambda seq, toks: len(toks) == 2))
    assert len(stopped) == 2 and stopped[1].finish_reasons == ["stop", "stop"]


@needs_onnx_venv
def test_sampling_is_reproducible_with_a_seed(onnx_model):
    prompts = [[5, 17, 42, 8], [30, 12, 77]]
    first, second = (onnx_model.generate_all(prompts, 6, temperature=1.0, top_p=0.9, seed=3)
                     for _ in range(2))
    assert first == second


@needs_onnx_venv
def test_int8_stays_close_to_fp32(onnx_export, onnx_model, tmp_path: Path):
    from toolkit.runtime.onnx_model import OnnxCausalLM

    facts = quantize_onnx_int8(onnx_export[0], tmp_path / "int8")
    int8 = OnnxCausalLM.from_dir(tmp_path / "int8", threads=1)
    ids = _ids(2, (1, 32), 200)
    ref, got = onnx_model.logits(ids), int8.logits(ids)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    assert facts["method"] and facts["reason"]
    assert (tmp_path / "int8" / "tokenizer.json").is_file()
