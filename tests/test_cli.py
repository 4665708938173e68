"""The CLI as users type it: help for every command, instant start, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.errors import ToolkitError
from toolkit.export import ExportFormat, MergeDtype
from toolkit.serve import EngineChoice, ServeSettings

runner = CliRunner()
COMMANDS = [
    [], ["validate"], ["data"], ["data", "validate"], ["data", "stats"], ["train"],
    ["export"], ["serve"], ["monitor"], ["monitor", "snapshot"], ["compare"],
    ["feedback"], ["feedback", "export"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "toolkit")
def test_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_help_imports_no_heavy_package() -> None:
    code = ("import sys; from toolkit.cli import app; "
            "heavy = [m for m in ('torch', 'transformers', 'vllm', 'onnxruntime', 'bitsandbytes') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_export_format_lists_choices(tmp_path) -> None:
    result = runner.invoke(app, ["export", str(tmp_path), "--quantize", "int3"])
    assert result.exit_code == 2
    assert "int3" in result.output and "gptq-int4" in result.output
    assert "Traceback" not in result.output


# --- issue 16: the command line as users type it -------------------------------------------

SMOL = "configs/model/smollm2-135m.yaml"


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Record what `toolkit train` would train instead of training."""
    seen: dict[str, Any] = {}

    def fake(cfg: Any, **kwargs: Any) -> None:
        seen.update(cfg=cfg, **kwargs)

    monkeypatch.setattr("toolkit.train.run_training", fake)
    return seen


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, ServeSettings]:
    seen: dict[str, ServeSettings] = {}
    monkeypatch.setattr("toolkit.serve.run_server", lambda settings: seen.update(settings=settings))
    return seen


def test_version() -> None:
    from toolkit import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"toolkit {__version__}"


def test_train_takes_the_config_positionally(trained: dict[str, Any]) -> None:
    result = runner.invoke(app, ["train", SMOL, "training.max_steps=2", "lora.r=16"])
    assert result.exit_code == 0, result.output
    assert trained["cfg"].lora.r == 16 and trained["cfg"].training.max_steps == 2
    assert trained["output"] == Path("runs/smollm2-135m") and trained["verbose"] is False
    # --config still works; the first override then sits where CONFIG would
    result = runner.invoke(app, ["train", "--config", SMOL, "lora.r=4", "--verbose"])
    assert result.exit_code == 0, result.output
    assert trained["cfg"].lora.r == 4 and trained["verbose"] is True


def test_train_usage_shows_overrides() -> None:
    result = runner.invoke(app, ["train", "--help"])
    assert "[CONFIG] [KEY=VALUE]..." in result.output


def test_bare_train_asks_for_a_config(trained: dict[str, Any]) -> None:
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2
    assert "smollm2-135m" in result.output and "no config given" in result.output
    assert not trained  # no 14 GB download started
    result = runner.invoke(app, ["train", SMOL, "configs/model/llama2-7b.yaml"])
    assert result.exit_code == 2 and "one config" in result.output


@pytest.mark.parametrize(("args", "suggestion"), [
    (["serve", "--max-concurency", "2", "x"], "--max-concurrency"),
    (["train", "--confg", "x"], "--config"),
    (["serve", "x", "--enforce-eager"], None),  # engine flags pass only after --
])
def test_unknown_options_are_usage_errors(args: list[str], suggestion: str | None,
                                          served: dict[str, Any], trained: dict[str, Any]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "No such option" in result.output
    assert suggestion is None or suggestion in result.output
    assert not served and not trained


def test_config_error_exits_1_with_did_you_mean(trained: dict[str, Any]) -> None:
    result = runner.invoke(app, ["train", SMOL, "lora.rank=4"])
    assert result.exit_code == 1
    assert "lora.rank: unknown field (did you mean 'r'?)" in result.output
    assert "Traceback" not in result.output and not trained


def test_shipped_files_are_found_from_another_cwd(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  trained: dict[str, Any]) -> None:
    from toolkit.shipped import ROOT, shipped_file

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["validate", SMOL])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", SMOL])
    assert result.exit_code == 0, result.output
    assert trained["cfg"].data.train == ROOT / "data" / "train.jsonl"
    assert trained["cfg"].data.eval == ROOT / "data" / "test.jsonl"
    assert shipped_file("monitoring/grafana/dashboards/toolkit.json", "--dashboard").is_file()
    with pytest.raises(ToolkitError, match="--data: the default data/nope.jsonl .* pass --data"):
        shipped_file("data/nope.jsonl", "--data")
    # a path that exists from the cwd wins over the shipped one
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    result = runner.invoke(app, ["train", SMOL])
    assert trained["cfg"].data.train == Path("data/train.jsonl")


def test_quantize_takes_commas_and_repeats(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake(source: Path, quantize: list[ExportFormat], **kwargs: Any) -> Any:
        seen.update(quantize=quantize, **kwargs)
        return type("Result", (), {"complete": True})()

    monkeypatch.setattr("toolkit.export.run_export", fake)
    result = runner.invoke(app, ["export", str(tmp_path), "--quantize", "merged,onnx-int8",
                                 "--quantize", "bnb-nf4", "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert seen["quantize"] == [ExportFormat.merged, ExportFormat.onnx_int8, ExportFormat.bnb_nf4]
    assert seen["dtype"] is MergeDtype.bf16
    result = runner.invoke(app, ["export", str(tmp_path), "--quantize", "merged,int3"])
    assert result.exit_code == 2 and "'int3' is not one of" in result.output


def test_serve_defaults_come_from_the_settings(served: dict[str, ServeSettings],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TOOLKIT_VLLM_PYTHON", "TOOLKIT_API_KEY", "TOOLKIT_FEEDBACK_DB"):
        monkeypatch.delenv(name, raising=False)  # scripts/test.sh sets the first one
    result = runner.invoke(app, ["serve", "m"])
    assert result.exit_code == 0, result.output
    assert served["settings"].model_dump() == ServeSettings(model="m").model_dump()
    help_text = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "300"}).output
    assert ServeSettings.model_fields["max_queue"].description in help_text


def test_serve_accepts_vllm_names_and_passthrough(served: dict[str, ServeSettings]) -> None:
    result = runner.invoke(app, ["serve", "m", "--engine", "vllm", "--served-model-name", "asst",
                                 "--", "--enforce-eager", "--max-num-seqs", "4"])
    assert result.exit_code == 0, result.output
    settings = served["settings"]
    assert settings.model_name == "asst" and settings.engine is EngineChoice.vllm
    assert settings.engine_args == ["--enforce-eager", "--max-num-seqs", "4"]


@pytest.mark.parametrize(("host", "url"), [
    ("127.0.0.1", "http://127.0.0.1:8000/v1"), ("::1", "http://[::1]:8000/v1"),
    ("0.0.0.0", "http://0.0.0.0:8000/v1"),
])
def test_listening_line(host: str, url: str) -> None:
    from toolkit.serve.server import listening_line

    assert listening_line(host, 8000, "merged", "transformers") == (
        f"listening on {url} (model merged, engine transformers)")
