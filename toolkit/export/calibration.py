"""Calibration texts for GPTQ and ONNX int8: the project's own FR/EN examples, rendered
exactly as the model sees them (chat template, system prompt, answer).

English-only calibration sets (C4, wikitext) hurt French: the quantizer fits the
activations it is shown, so it is shown our bilingual conversations.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from toolkit.data.prompts import chat_messages
from toolkit.data.schema import load_examples


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_data(path: Path, examples: list[Any]) -> dict[str, Any]:
    """{path, sha256, examples, by_language} for reports."""
    return {"path": str(path), "sha256": file_sha256(path), "examples": len(examples),
            "by_language": dict(sorted(Counter(e.language for e in examples).items()))}


def calibration_texts(path: Path, tokenizer: Any,
                      system_prompt: str | None) -> tuple[list[str], dict[str, Any]]:
    """Render every example of `path` as a full conversation (system, user, assistant).

    Returns:
        The texts, and a description {path, sha256, examples, by_language, warning}.

    Raises:
        DataError: the file is missing or invalid (`toolkit data validate` names the lines).
    """
    from tqdm import tqdm

    examples = load_examples(Path(path))
    texts = []
    for example in tqdm(examples, desc="calibration", unit="ex", leave=False):
        messages = chat_messages(example, system_prompt)
        messages.append({"role": "assistant", "content": example.output})
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    info = describe_data(Path(path), examples)
    languages = set(info["by_language"])
    info["warning"] = None
    if not {"fr", "en"} <= languages:
        info["warning"] = (f"calibration data {path} holds only {', '.join(sorted(languages))} "
                           "examples; a one-language calibration set hurts the other language")
    return texts, info
