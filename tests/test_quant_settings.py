"""The gptq-int4 / bnb-* settings: what the exporters pass to the quantizers, what the reports
record, and the method benchmark that chose them (`benchmarks/quant_methods.py`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from toolkit.export.registry import unavailable_reason
from toolkit.formats import ExportFormat

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("quant_methods_bench", REPO_ROOT / "benchmarks" / "quant_methods.py")


def test_bnb_config_passes_every_setting() -> None:
    pytest.importorskip("transformers")
    import torch

    from toolkit.export.bnb import bnb_config, int8_settings, nf4_settings

    int8 = bnb_config({**int8_settings(), "llm_int8_threshold": 3.0,
                       "skip_modules": ["lm_head", "down_proj"]})
    assert int8.load_in_8bit and int8.llm_int8_threshold == 3.0
    assert int8.llm_int8_skip_modules == ["lm_head", "down_proj"]
    nf4 = bnb_config({**nf4_settings("bfloat16"), "double_quant": False, "scheme": "fp4",
                      "quant_storage": "bfloat16"})
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "fp4"
    assert not nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert nf4.bnb_4bit_quant_storage == torch.bfloat16


def test_skipped_modules_stay_16_bit(tiny_model_dir: Path, tmp_path: Path) -> None:
    if unavailable_reason(ExportFormat.bnb_nf4) is not None:
        pytest.skip("bitsandbytes cannot quantize on this machine")
    from toolkit.export.bnb import nf4_settings, quantize_bnb

    every = quantize_bnb(tiny_model_dir, tmp_path / "all", nf4_settings("float16"),
                         dtype="float16")
    kept = quantize_bnb(tiny_model_dir, tmp_path / "kept",
                        {**nf4_settings("float16"), "skip_modules": ["lm_head", "down_proj"]},
                        dtype="float16")
    assert every == 2 * 7 and kept == 2 * 6  # 2 layers x 7 linears; down_proj kept
    config = json.loads((tmp_path / "kept" / "config.json").read_text())
    assert config["quantization_config"]["llm_int8_skip_modules"] == ["lm_head", "down_proj"]


def test_quantized_kernels_names_each_quantized_linear_class() -> None:
    import torch

    from toolkit.export.gptq import quantized_kernels

    class FusedInt4(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("qweight", torch.zeros(2, 2, dtype=torch.int32))

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), FusedInt4(), FusedInt4())
    assert quantized_kernels(model) == ["FusedInt4"]
    assert quantized_kernels(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


def test_every_benchmark_variant_names_settings_the_exporters_know(bench: ModuleType) -> None:
    from toolkit.export.bnb import int8_settings, nf4_settings
    from toolkit.export.gptq import QUANTIZE_CONFIG_KEYS

    variants = bench.variants()
    assert len({v.name for v in variants}) == len(variants)
    bnb_keys = set(int8_settings()) | set(nf4_settings("float16"))
    for variant in variants:
        keys = set(variant.overrides)
        if variant.family == "gptq":
            assert keys <= set(QUANTIZE_CONFIG_KEYS) | {"calibration_fraction"}, variant.name
        elif variant.family == "bnb":
            assert keys <= bnb_keys and variant.overrides["bits"] in (4, 8), variant.name
        else:
            assert variant.family == "hqq" and keys == {"nbits", "group_size"}
    # the shipped defaults are measured in every run
    assert {"bnb-int8 t6 (default)", "bnb-nf4 dq (default)", "gptq g32 sym (default)"} <= {
        v.name for v in variants}
    # the GPTQ default row changes nothing: it measures what the exporter ships
    assert next(v for v in variants if v.name == "gptq g32 sym (default)").overrides == {}


def test_method_table_renders_ok_and_failed_rows() -> None:
    results = _load("benchmark_results_q", REPO_ROOT / "benchmarks" / "results.py")
    ok = {"variant": "gptq g32", "status": "ok", "weights_bytes": 110e6, "size_ratio": 0.41,
          "perplexity": {"overall": 35.0, "fr": 30.0, "en": 40.0},
          "delta_pct": {"overall": 3.5, "fr": 2.0, "en": 5.0}, "tokens_per_s": 20.0,
          "speed_vs_merged": 1.25, "quantize_s": 100.0, "kernels": ["TorchQuantLinear"]}
    failed = {"variant": "gptq lm_head", "status": "failed", "reason": "tied lm_head"}
    table = results.render_quant_methods({"rows": [ok, failed], "settings": {
        "run": "runs/demo", "threads": 1,
        "reference_perplexity": {"overall": 33.8, "fr": 29.4, "en": 38.1}}})
    assert "| gptq g32 | 110 | 41% | 35.00 | +2.0 % | +5.0 % | +3.5 % | 20.0 | 1.25x | 100 | " \
           "TorchQuantLinear |" in table
    assert "failed: tied lm_head" in table and "ppl 33.80 (fr 29.40, en 38.10)" in table


def test_int8_default_is_the_best_measured_variant_at_its_size() -> None:
    from toolkit.export.bnb import INT8_MEASUREMENTS, INT8_THRESHOLD, int8_settings

    chosen = [row for row in INT8_MEASUREMENTS if "(chosen)" in row[0]]
    assert len(chosen) == 1 and f"threshold {INT8_THRESHOLD:g} " in chosen[0][0]
    no_larger = [row for row in INT8_MEASUREMENTS if row[4] <= chosen[0][4]]
    assert min(no_larger, key=lambda row: row[3]) == chosen[0]
    settings = int8_settings()
    assert settings["llm_int8_threshold"] == INT8_THRESHOLD
    # the report's quantization block carries the alternatives with their numbers
    assert [row["variant"] for row in settings["measured"]] == [r[0] for r in INT8_MEASUREMENTS]
    assert {"delta_fr_pct", "delta_en_pct", "size_ratio"} <= set(settings["measured"][0])
