"""The JSONL schema of the project's examples, and a validator that reports every error.

One example per line: `id`, `language` (fr|en), `category` (protocol|training|incident),
`instruction`, optional `input`, `output`. The validator keeps going after an error so a
user sees every bad line at once, each with its line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from toolkit.errors import DataError
from toolkit.suggest import did_you_mean

Language = Literal["fr", "en"]
Category = Literal["protocol", "training", "incident"]
LANGUAGES: tuple[str, ...] = get_args(Language)
CATEGORIES: tuple[str, ...] = get_args(Category)
REQUIRED_FIELDS: tuple[str, ...] = ("id", "language", "category", "instruction", "output")
OPTIONAL_FIELDS: tuple[str, ...] = ("input",)


@dataclass(frozen=True)
class Example:
    """One instruction/answer pair."""

    id: str
    language: str
    category: str
    instruction: str
    output: str
    input: str = ""

    def to_json(self) -> dict[str, str]:
        """The example as a JSONL record (`input` only when non-empty)."""
        record = {"id": self.id, "language": self.language, "category": self.category,
                  "instruction": self.instruction}
        if self.input:
            record["input"] = self.input
        record["output"] = self.output
        return record


@dataclass(frozen=True)
class DataIssue:
    """One problem found in a data file."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def _check_record(record: object, line: int, seen: dict[str, int]) -> list[DataIssue]:
    if not isinstance(record, dict):
        return [DataIssue(line, "expected a JSON object")]
    issues = []
    for field in REQUIRED_FIELDS:
        value = record.get(field)
        if field not in record:
            issues.append(DataIssue(line, f"missing field '{field}'"))
        elif not isinstance(value, str) or not value.strip():
            issues.append(DataIssue(line, f"field '{field}' must be a non-empty string"))
    if "input" in record and not isinstance(record["input"], str):
        issues.append(DataIssue(line, "field 'input' must be a string when present"))
    unknown = set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS)
    if unknown:
        issues.append(DataIssue(line, f"unknown field(s) {sorted(unknown)}"))
    language, category = record.get("language"), record.get("category")
    if isinstance(language, str) and language.strip() and language not in LANGUAGES:
        issues.append(DataIssue(line, f"unknown language {language!r}"
                                f"{did_you_mean(language, LANGUAGES)} (use one of {LANGUAGES})"))
    if isinstance(category, str) and category.strip() and category not in CATEGORIES:
        issues.append(DataIssue(line, f"unknown category {category!r}"
                                f"{did_you_mean(category, CATEGORIES)} (use one of {CATEGORIES})"))
    example_id = record.get("id")
    if isinstance(example_id, str) and example_id.strip():
        if example_id in seen:
            issues.append(
                DataIssue(line, f"duplicate id {example_id!r} (first seen on line {seen[example_id]})")
            )
        else:
            seen[example_id] = line
    return issues


def validate_file(path: Path) -> tuple[list[Example], list[DataIssue]]:
    """Parse a JSONL file, returning the valid examples and every issue found.

    Lines are decoded one by one as UTF-8, a byte-order mark tolerated (Notepad and Excel
    write one), so a file in another encoding is reported at its first bad line with the fix
    instead of failing with a decoder traceback.

    Raises:
        DataError: the file is missing (nothing to validate).
    """
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    examples: list[Example] = []
    issues: list[DataIssue] = []
    seen: dict[str, int] = {}
    with path.open("rb") as handle:
        for line_no, raw_bytes in enumerate(handle, start=1):
            try:
                raw = raw_bytes.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError:
                issues.append(DataIssue(line_no, "not UTF-8 (save as UTF-8)"))
                continue
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                issues.append(DataIssue(line_no, f"invalid JSON: {exc.msg} (column {exc.colno})"))
                continue
            found = _check_record(record, line_no, seen)
            if found:
                issues.extend(found)
                continue
            examples.append(Example(**{k: record[k] for k in record}))
    if not examples and not issues:
        issues.append(DataIssue(0, "file is empty: add one JSON example per line"))
    return examples, issues


def load_examples(path: Path) -> list[Example]:
    """Load a data file that must be fully valid (training, evaluation, calibration).

    Raises:
        DataError: one line naming the file, the first problems and `toolkit data validate`.
    """
    examples, issues = validate_file(path)
    if issues:
        shown = "; ".join(str(i) for i in issues[:3])
        more = f" (+{len(issues) - 3} more)" if len(issues) > 3 else ""
        raise DataError(
            f"{path}: {len(issues)} problem(s): {shown}{more}; run `toolkit data validate {path}`"
        )
    return examples


def write_examples(examples: list[Example], path: Path) -> None:
    """Write examples as JSONL atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example.to_json(), ensure_ascii=False) + "\n")
    tmp.replace(path)
