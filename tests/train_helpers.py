"""Training data and configs for the train tests (a helper module, not a test module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.config import config_from_dict
from toolkit.data.schema import Example

FR_ANSWER = "Frictionnez les mains avec la solution hydro-alcoolique trente secondes."
EN_ANSWER = "Rub your hands with the alcohol-based solution for thirty seconds."


def make_examples(count: int, prefix: str) -> list[Example]:
    """Short FR/EN examples of varied length (so padding and packing differ)."""
    examples = []
    for i in range(count):
        language = "fr" if i % 3 else "en"
        answer = FR_ANSWER if language == "fr" else EN_ANSWER
        question = ("Comment se frictionner les mains ?" if language == "fr"
                    else "How do I rub my hands?")
        examples.append(Example(
            id=f"{prefix}{i}", language=language,
            category=("protocol", "training", "incident")[i % 3],
            instruction=question, output=" ".join([answer] * (1 + i % 3)),
            input="Service de cardiologie." if i % 5 == 0 else "",
        ))
    return examples


def make_config(model_dir: Path, data: tuple[Path, Path], **training: Any) -> Any:
    """A fast config for the tiny model; keyword arguments override `training`."""
    settings = {"batch_size": 4, "grad_accum": 1, "learning_rate": 1e-2, "epochs": 2,
                "max_seq_len": 512, "packing": True, "threads": 1, "warmup_ratio": 0.0}
    settings.update(training)
    return config_from_dict({
        "model": {"source": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": settings,
        "data": {"train": str(data[0]), "eval": str(data[1])},
    })


def write_yaml(path: Path, cfg: Any) -> Path:
    """Save a config as the YAML a user would pass to `toolkit train --config`."""
    import yaml

    from toolkit.config import config_to_dict

    path.write_text(yaml.safe_dump(config_to_dict(cfg)), encoding="utf-8")
    return path
