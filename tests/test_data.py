"""The shipped data set's balance, and `toolkit data validate` on each kind of broken file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.data.report import stats_for
from toolkit.data.schema import load_examples, validate_file
from toolkit.errors import DataError

runner = CliRunner()
GOOD = {"id": "a", "language": "fr", "category": "protocol", "instruction": "Q ?", "output": "R."}


def test_train_split_matches_the_seed(repo_root: Path) -> None:
    stats = stats_for(repo_root / "data" / "train.jsonl")
    assert stats.total == 56
    assert stats.by_language == {"fr": 35, "en": 21}
    assert stats.by_category == {"protocol": 28, "training": 24, "incident": 4}
    assert [stats.share(stats.by_language[k]) for k in ("fr", "en")] == [62.5, 37.5]
    assert [stats.share(stats.by_category[k]) for k in ("protocol", "training", "incident")] == [
        50.0, 42.9, 7.1]


def test_test_split_covers_every_group(repo_root: Path) -> None:
    stats = stats_for(repo_root / "data" / "test.jsonl")
    assert stats.total >= 16
    assert all(stats.by_language.values()) and all(stats.by_category.values())


def test_ids_unique_across_splits(repo_root: Path) -> None:
    train = {e.id for e in load_examples(repo_root / "data" / "train.jsonl")}
    test = {e.id for e in load_examples(repo_root / "data" / "test.jsonl")}
    assert not train & test


def test_stats_cli_prints_the_seed_percentages(repo_root: Path) -> None:
    result = runner.invoke(app, ["data", "stats", str(repo_root / "data" / "train.jsonl")])
    assert result.exit_code == 0, result.output
    for text in ("56 examples", "62.5 %", "37.5 %", "50.0 %", "42.9 %", "7.1 %"):
        assert text in result.output


def test_stats_token_percentiles(tmp_path: Path, tiny_model_dir: Path, repo_root: Path) -> None:
    stats = stats_for(repo_root / "data" / "test.jsonl", str(tiny_model_dir))
    assert 0 < stats.token_percentiles["p50"] <= stats.token_percentiles["p100"]


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("line2", "expected"),
    [
        ("{not json", "line 2: invalid JSON"),
        (json.dumps({**GOOD, "id": "b", "output": ""}), "line 2: field 'output' must be a non-empty"),
        (json.dumps({k: v for k, v in {**GOOD, "id": "b"}.items() if k != "instruction"}),
         "line 2: missing field 'instruction'"),
        (json.dumps({**GOOD, "id": "b", "language": "de"}), "line 2: unknown language 'de'"),
        (json.dumps({**GOOD, "id": "b", "category": "faq"}), "line 2: unknown category 'faq'"),
        (json.dumps(GOOD), "line 2: duplicate id 'a' (first seen on line 1)"),
        (json.dumps({**GOOD, "id": "b", "extra": 1}), "line 2: unknown field(s) ['extra']"),
    ],
    ids=["bad-json", "empty-field", "missing-field", "language", "category", "duplicate", "unknown"],
)
def test_validate_reports_each_error_kind(tmp_path: Path, line2: str, expected: str) -> None:
    path = _write(tmp_path, [json.dumps(GOOD), line2])
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 1
    assert expected in result.output


def test_validate_reports_every_bad_line(tmp_path: Path) -> None:
    path = _write(tmp_path, ["{", json.dumps({**GOOD, "language": "xx"}), "[]"])
    _, issues = validate_file(path)
    assert [i.line for i in issues] == [1, 2, 3]


def test_validate_ok_and_empty(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "validate", str(_write(tmp_path, [json.dumps(GOOD)]))])
    assert result.exit_code == 0 and "ok, 1 examples" in result.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = runner.invoke(app, ["data", "validate", str(empty)])
    assert result.exit_code == 1 and "empty" in result.output


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 1 and "no such data file" in result.output
    with pytest.raises(DataError, match="toolkit data validate"):
        load_examples(_write(tmp_path, ["{"]))


def test_bom_and_windows_line_ends_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "excel.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n")
    examples, issues = validate_file(path)
    assert not issues and examples[0].id == "a"


def test_non_utf8_line_names_the_line_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "notepad.jsonl"
    second = json.dumps({**GOOD, "id": "b", "output": "Réponse."}, ensure_ascii=False)
    path.write_bytes((json.dumps(GOOD) + "\n" + second + "\n").encode("cp1252"))
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 1
    assert "line 2: not UTF-8 (save as UTF-8)" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("field", "value", "hint"), [
    ("language", "FR", "did you mean 'fr'?"), ("category", "Protocol", "did you mean 'protocol'?"),
    ("category", "incidents", "did you mean 'incident'?"),
])
def test_bad_label_suggests_the_valid_one(tmp_path: Path, field: str, value: str,
                                          hint: str) -> None:
    _, issues = validate_file(_write(tmp_path, [json.dumps({**GOOD, field: value})]))
    assert hint in str(issues[0])
