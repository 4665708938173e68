"""The contract between the stages: what a folder is, and one-line refusals of bad artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.artifact_builders import export_report, make_export, write_run_manifest
from toolkit.artifacts import (
    MANIFEST_KEYS,
    ArtifactError,
    Kind,
    export_format,
    identify,
    read_export,
    read_run,
    trained_system_prompt,
    write_export,
)
from toolkit.export.vllm_compat import engine_hint
from toolkit.formats import REGISTRY, ExportFormat


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_identify_tells_runs_exports_adapters_and_models_apart(tmp_path: Path,
                                                               tiny_model_dir: Path) -> None:
    run = tmp_path / "run"
    write_run_manifest(run, tiny_model_dir)
    export = make_export(tmp_path, "merged", {})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    onnx = tmp_path / "bare-onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"")
    assert identify(run) is Kind.run and identify(export) is Kind.export
    assert identify(adapter) is Kind.adapter and identify(onnx) is Kind.export
    assert identify(tiny_model_dir) is Kind.model
    assert identify(tmp_path / "missing") is None and identify("embedded:smollm2-135m") is None


def test_a_version_1_manifest_is_read(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Manifests written before artifacts.py existed have the same version-1 keys."""
    run = tmp_path / "run"
    path = write_run_manifest(run, tiny_model_dir, system_prompt="Be brief.", max_seq_len=128)
    data = json.loads(path.read_text())
    assert data["manifest_version"] == 1 and set(data) == set(MANIFEST_KEYS)
    manifest = read_run(run)
    assert manifest.base_model.source == str(tiny_model_dir)
    assert (manifest.system_prompt, manifest.max_seq_len, manifest.qlora) == ("Be brief.", 128, False)
    assert trained_system_prompt(run) == "Be brief."


def test_bad_manifests_are_refused_in_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(ArtifactError, match="no manifest.json; pass the folder of a finished"):
        read_run(run)
    path = write_run_manifest(run, tiny_model_dir)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "manifest_version": 7}))
    with pytest.raises(ArtifactError) as info:
        read_run(run)
    assert "manifest_version 7 is newer" in _one_line(info) and "upgrade toolkit" in str(info.value)
    del data["base_model"]
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError) as info:
        read_run(run)
    assert "base_model" in _one_line(info) and "re-run `toolkit train`" in str(info.value)


def test_bad_reports_are_refused_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "merged"
    folder.mkdir()
    with pytest.raises(ArtifactError, match="no export_report.json"):
        read_export(folder)
    (folder / "export_report.json").write_text(json.dumps({"format": "gguf"}))
    with pytest.raises(ArtifactError) as info:
        read_export(folder)
    assert "format" in _one_line(info) and "re-run `toolkit export`" in str(info.value)
    write_export(folder, export_report(folder, "merged", system_prompt=None))
    assert read_export(folder).format is ExportFormat.merged
    assert trained_system_prompt(folder) == ""  # exported from a run trained without one


def test_format_of_a_folder_without_report(tmp_path: Path) -> None:
    for quant, fmt in (({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bnb-nf4"),
                       ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bnb-int8"),
                       ({"quant_method": "gptq", "bits": 4}, "gptq-int4"), (None, "merged")):
        folder = tmp_path / fmt
        folder.mkdir()
        config = {"quantization_config": quant} if quant else {}
        (folder / "config.json").write_text(json.dumps(config))
        assert export_format(folder) is ExportFormat(fmt)


@pytest.mark.parametrize("fmt", list(ExportFormat), ids=lambda f: f.value)
def test_engines_come_from_the_registry(fmt: ExportFormat) -> None:
    spec = REGISTRY[fmt]
    assert engine_hint(fmt, {"loadable": True}) == list(spec.engines)
    assert "vllm" not in engine_hint(fmt, {"loadable": False})
    assert spec.quantized == (spec.bits is not None)
    assert (spec.family == "onnx") == (spec.engines == ("onnxruntime",))
