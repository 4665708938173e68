"""`toolkit compare` on tiny variants: every file, every number, valid charts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.tiny_model import build_tiny_model
from toolkit.cli import app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-b"), repo_root / "data", seed=1)


def test_compare_two_variants(tmp_path: Path, tiny_model_dir: Path, second_model: Path,
                              repo_root: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(app, [
        "compare", str(tiny_model_dir), str(second_model), "--data",
        str(repo_root / "data" / "test.jsonl"), "--out", str(out), "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "compare.json").read_text())
    assert len(payload["variants"]) == 2
    n_test = sum(1 for _ in (repo_root / "data" / "test.jsonl").open())
    for variant in payload["variants"]:
        ppl = variant["perplexity"]
        # A random model over a ~500-token vocabulary: perplexity is finite and large.
        assert math.isfinite(ppl["overall"]) and ppl["overall"] > 10
        assert set(ppl["by_language"]) == {"fr", "en"}
        assert set(ppl["by_category"]) == {"protocol", "training", "incident"}
        assert set(variant["chrf"]["by_language"]) == {"fr", "en"}
        assert 0 <= variant["chrf"]["overall"] <= 100
        assert variant["size_bytes"] > 0 and variant["peak_rss_bytes"] > 0
        assert variant["tokens_per_s"] > 0
        assert len(variant["generations"]) == n_test
    # Different random weights give different perplexities: the numbers are measured.
    first, second = (v["perplexity"]["overall"] for v in payload["variants"])
    assert first != second
    markdown = (out / "compare.md").read_text()
    assert markdown.count("\n| ") >= 4 and "chrF fr" in markdown
    for chart in ("quality_vs_size.png", "fr_vs_en.png"):
        assert (out / chart).read_bytes()[:8] == PNG_MAGIC

    again = CliRunner().invoke(app, ["compare", str(tiny_model_dir), "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output


def test_compare_bad_data_fails_before_loading(tmp_path: Path, tiny_model_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    result = CliRunner().invoke(app, ["compare", str(tiny_model_dir), "--data", str(bad),
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "toolkit data validate" in result.output
    assert not (tmp_path / "r").exists()
