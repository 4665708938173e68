"""Typed training configs: one YAML file per base model, validated before any heavy work.

Every problem in a file is collected and raised once, naming the file, the field and the
valid choices, so a user fixes a config in one go (LitGPT `validate_args`, torchtune
`ConfigError`). `toolkit validate FILE` runs exactly these checks.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from toolkit.errors import ConfigError
from toolkit.shipped import resolve_user_path
from toolkit.suggest import did_you_mean


class Precision(str, Enum):
    """Training precision. fp16/bf16 fall back to what a CPU supports (with a warning)."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class BaseQuantization(str, Enum):
    """How the frozen base is loaded for training: `nf4` is QLoRA (bitsandbytes, CUDA)."""

    none = "none"
    nf4 = "nf4"


class _Section(BaseModel):
    # Unknown keys are typos more often than intentions: refuse them.
    model_config = ConfigDict(extra="forbid", use_enum_values=False)


class ModelSection(_Section):
    source: str = Field(description="Local HF folder, hub id, or embedded:smollm2-135m.")
    revision: str | None = Field(
        default=None, description="Hub revision (commit or tag); pins what 'source' means."
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the hub (off: it runs arbitrary code)."
    )


class LoraSection(_Section):
    r: int = Field(gt=0, description="LoRA rank.")
    alpha: float = Field(gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        min_length=1, description="Linear module names to adapt, e.g. [q_proj, v_proj]."
    )


class TrainingSection(_Section):
    batch_size: int = Field(gt=0, description="Examples (or packed sequences) per device step.")
    grad_accum: int = Field(default=1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(gt=0, description="Peak learning rate (linear decay, warmup).")
    epochs: float = Field(gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, gt=0, description="Stop after this many optimizer steps (demo/tests)."
    )
    warmup_ratio: float = Field(default=0.03, ge=0.0, lt=1.0, description="Warmup fraction.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    precision: Precision = Field(default=Precision.fp32, description="fp32, fp16 or bf16.")
    quantization: BaseQuantization = Field(
        default=BaseQuantization.none, description="none, or nf4 for QLoRA on a GPU."
    )
    max_seq_len: int = Field(default=1024, gt=8, description="Longer examples are truncated.")
    packing: bool = Field(
        default=False, description="Pack several examples per sequence (no cross-attention)."
    )
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for memory.")
    seed: int = Field(default=42, description="Seed for shuffling, dropout and init.")
    threads: int | None = Field(
        default=None, gt=0, description="CPU threads for torch (None: torch's default)."
    )
    logging_steps: int = Field(default=1, gt=0, description="Optimizer steps between log lines.")


class DataSection(_Section):
    train: Path = Field(default=Path("data/train.jsonl"), description="Training JSONL.")
    eval: Path | None = Field(default=Path("data/test.jsonl"), description="Held-out JSONL.")
    system_prompt: str = Field(
        default=(
            "You are a careful hospital assistant for staff. Answer in the language of the "
            "question, follow the institution's protocols, and never invent patient data."
        ),
        description="System message rendered before every example.",
    )

    @field_validator("train", "eval")
    @classmethod
    def _shipped_data(cls, path: Path | None) -> Path | None:
        # the shipped configs say data/train.jsonl: found from any cwd, not only the checkout
        return None if path is None else resolve_user_path(path)


class TrainConfig(_Section):
    """A complete training recipe: base model, LoRA, optimisation and data."""

    model: ModelSection
    lora: LoraSection
    training: TrainingSection
    data: DataSection = Field(default_factory=DataSection)

    @model_validator(mode="after")
    def _cross_field_checks(self) -> TrainConfig:
        problems: list[str] = []
        if len(set(self.lora.target_modules)) != len(self.lora.target_modules):
            problems.append("lora.target_modules: duplicate names; list each module once")
        if (
            self.training.quantization is BaseQuantization.nf4
            and self.training.precision is Precision.fp32
        ):
            problems.append(
                "training.precision: QLoRA (quantization: nf4) computes in fp16 or bf16; "
                "set precision to fp16 or bf16"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _known_fields(loc: tuple[int | str, ...]) -> list[str]:
    """The field names valid at `loc` (a path of section names) in a `TrainConfig`."""
    model: type[BaseModel] = TrainConfig
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _format_validation_error(path: Path | str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        ctx = item.get("ctx") or {}
        if item["type"] == "enum" and "expected" in ctx:
            message = f"got {item.get('input')!r}, expected one of {ctx['expected']}"
        elif item["type"] == "extra_forbidden":
            message = "unknown field" + (
                did_you_mean(str(item["loc"][-1]), _known_fields(item["loc"][:-1]))
                or " (check the spelling)")
        elif item["type"] == "value_error":
            message = message.removeprefix("Value error, ")
            field = field if field != "(top level)" else "config"
        lines.append(f"{field}: {message}")
    return f"{path}: invalid config: " + "; ".join(lines)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `training.epochs=1 lora.r=16` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. training.epochs=1")
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, turning syntax errors into one-line `ConfigError`s."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 (save as UTF-8)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with model/lora/training sections")
    return data


def config_from_dict(data: dict[str, Any], origin: Path | str = "<config>") -> TrainConfig:
    """Validate a dict as a `TrainConfig`; every bad field is reported in one message."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(origin, exc)) from None


def load_config(path: Path, overrides: list[str] | None = None) -> TrainConfig:
    """Load a training config from YAML, apply `key=value` overrides, and validate it.

    A relative `path` missing from the cwd is looked up in the installation, so the shipped
    `configs/model/*.yaml` work from any folder.
    """
    data = _merge(read_yaml(resolve_user_path(path)), parse_overrides(overrides or []))
    return config_from_dict(data, path)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (recorded in manifests)."""
    return config.model_dump(mode="json")
