"""The one model resolver: local folders, hub ids offline, and the embedded SmolLM2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from toolkit.errors import ModelSourceError
from toolkit.model_source import resolve_model


def test_local_folder(tiny_model_dir: Path) -> None:
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.kind == "local" and resolved.path == tiny_model_dir.resolve()


def test_folder_without_tokenizer(tmp_path: Path, tiny_model_dir: Path) -> None:
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelSourceError, match="has no tokenizer"):
        resolve_model(str(tmp_path))


def test_hub_id_offline_says_pass_a_folder() -> None:
    with pytest.raises(ModelSourceError, match="pass the local folder"):
        resolve_model("example-org/model-that-is-not-cached")


def test_unknown_embedded_name() -> None:
    with pytest.raises(ModelSourceError, match="embedded:smollm2-135m"):
        resolve_model("embedded:gpt-5")


def test_embedded_model_generates_and_is_cached(embedded_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = embedded_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = resolve_model("embedded:smollm2-135m")
    assert again.path == embedded_model_dir and weights.stat().st_mtime_ns == before

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    assert tokenizer.chat_template, "the chat template must survive the GGUF conversion"
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is hand hygiene?"}],
        tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0
