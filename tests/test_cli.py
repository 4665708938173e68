"""The CLI as users type it: help for every command, instant start, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from toolkit.cli import app

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
