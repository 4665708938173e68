"""Every shipped config validates; bad configs fail with one message naming each field."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import REPO_ROOT
from toolkit.cli import app
from toolkit.config import load_config
from toolkit.errors import ConfigError

CONFIG_DIR = REPO_ROOT / "configs" / "model"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
SMOLLM2 = CONFIG_DIR / "smollm2-135m.yaml"
SEED = CONFIG_DIR / "training_config.yaml"
runner = CliRunner()


def test_configs_are_found() -> None:
    """The parametrized test below would pass vacuously on an empty list."""
    assert SMOLLM2 in CONFIGS and SEED in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 32, 0.1)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert (cfg.training.batch_size, cfg.training.grad_accum, cfg.training.epochs) == (4, 4, 3)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output


def test_seed_recipe_is_exact() -> None:
    cfg = load_config(SEED)
    assert cfg.model.source == "mistralai/Mistral-7B-v0.1"
    assert cfg.training.learning_rate == 2e-5
    assert cfg.training.precision.value == "fp16"


def test_phase_configs_differ_only_in_source() -> None:
    seed = load_config(SEED).model_dump()
    for name in ("deepseek-coder", "llama2-7b", "codellama-7b"):
        other = load_config(CONFIG_DIR / f"{name}.yaml").model_dump()
        assert other["model"]["source"] != seed["model"]["source"]
        other["model"]["source"] = seed["model"]["source"]
        assert other == seed, name


def test_bad_config_lists_every_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: {source: x}\n"
        "lora: {r: 0, alpha: 32, dropout: 0.1, target_modules: [q_proj]}\n"
        "training: {batch_size: 4, learning_rate: 1.0e-4, epochs: 1, precision: fp64, bogus: 1}\n"
    )
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    message = result.output
    assert str(bad) in message
    assert "lora.r" in message and "training.bogus" in message
    assert "training.precision" in message and "'fp16'" in message and "'bf16'" in message
    assert "Traceback" not in message


def test_broken_yaml_names_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  source: [x\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML \(line"):
        load_config(bad)


def test_overrides_apply_and_validate() -> None:
    cfg = load_config(SMOLLM2,
                      ["training.max_steps=2", "lora.r=16"])
    assert cfg.training.max_steps == 2 and cfg.lora.r == 16
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(SMOLLM2, ["training.max_steps"])
    with pytest.raises(ConfigError, match="training.epochs"):
        load_config(SMOLLM2, ["training.epochs=-1"])


def test_qlora_needs_half_precision(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="QLoRA"):
        load_config(SMOLLM2,
                    ["training.quantization=nf4", "training.precision=fp32"])


@pytest.mark.parametrize(("override", "hint"), [
    ("lora.rank=4", "lora.rank: unknown field (did you mean 'r'?)"),
    ("training.epoch=1", "training.epoch: unknown field (did you mean 'epochs'?)"),
    ("trainig.epochs=1", "trainig: unknown field (did you mean 'training'?)"),
    ("training.zzz=1", "training.zzz: unknown field (check the spelling)"),
])
def test_unknown_key_suggests_the_field(override: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Path("configs/model/smollm2-135m.yaml"), [override])
    assert hint in str(info.value)


def test_config_with_bom_or_latin1(tmp_path: Path) -> None:
    text = Path("configs/model/smollm2-135m.yaml").read_text(encoding="utf-8")
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_config(bom).lora.r == 8
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"# r\xe9glages\n" + text.encode())
    with pytest.raises(ConfigError, match=r"latin.yaml: line 1: not UTF-8 \(save as UTF-8\)"):
        load_config(latin)
