"""The README's measured tables are rendered from the benchmark result files, never typed."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_results",
                                                  REPO_ROOT / "benchmarks" / "results.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_and_results_md_match_the_saved_results(results: ModuleType) -> None:
    saved = sorted(p.stem for p in (REPO_ROOT / "benchmarks" / "results").glob("*.json"))
    assert saved == sorted(results.RENDERERS), "every renderer has a saved result and back"
    assert results.stale() == [], "run `.venv/bin/python benchmarks/results.py` and commit"
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for name in results.RENDERERS:
        assert f"<!-- results:{name} -->" in readme


def test_a_hand_edited_figure_is_caught(results: ModuleType, tmp_path: Path) -> None:
    data_dir = tmp_path / "results"
    shutil.copytree(REPO_ROOT / "benchmarks" / "results", data_dir)
    readme, results_md = tmp_path / "README.md", tmp_path / "RESULTS.md"
    readme.write_text(results.render_readme((REPO_ROOT / "README.md").read_text(encoding="utf-8"),
                                            data_dir), encoding="utf-8")
    results_md.write_text(results.render_results_md(data_dir), encoding="utf-8")
    assert results.stale(readme, results_md, data_dir) == []

    # a new measurement saved without re-rendering: both generated files are stale
    path = data_dir / "export_quality.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    row = next(r for r in data["rows"] if r.get("tokens_per_s"))
    row["tokens_per_s"] = row["tokens_per_s"] * 2 + 1
    path.write_text(json.dumps(data), encoding="utf-8")
    assert results.stale(readme, results_md, data_dir) == ["README.md's results blocks", "RESULTS.md"]

    # re-rendering shows the new figure
    rendered = results.render_readme(readme.read_text(encoding="utf-8"), data_dir)
    assert f"{row['tokens_per_s']:.1f}" in rendered


def test_environment_names_the_cpu_and_versions(results: ModuleType) -> None:
    env = results.environment()
    assert env["cpu_count"] >= 1 and env["packages"]["torch"].startswith("2.13.0")
    assert set(env["isa"]) <= set(results.ISA_FLAGS) and len(env["date"]) == 10
