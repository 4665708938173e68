"""`toolkit export` on the tiny model: merge exactness, every CPU format's round trip and
report, atomic writes, refusals, and the messages for formats this machine cannot make."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import toolkit.cpu
from tests.artifact_builders import save_lora_adapter, write_run_manifest
from toolkit.artifacts import ADAPTER_DIR, REPORT_KEYS
from toolkit.atomic import ExportExistsError
from toolkit.cli import app
from toolkit.errors import ConfigError, DataError, ToolkitError
from toolkit.export import ExportFormat, load_export, run_export
from toolkit.export.registry import parse_dtype, parse_formats, unavailable_reason

runner = CliRunner()
SYSTEM_PROMPT = "You are a careful hospital assistant for staff."
ROWS = [
    ("fr", "protocol", "Quelles sont les étapes de l'hygiène des mains ?",
     "Mouiller les mains, appliquer le savon, frotter vingt secondes, rincer et sécher."),
    ("en", "protocol", "What are the steps of hand hygiene?",
     "Wet your hands, apply soap, rub for twenty seconds, rinse and dry."),
    ("fr", "training", "Comment vérifier l'identité d'un patient ?",
     "Demander nom, prénom et date de naissance, puis comparer avec le bracelet."),
    ("en", "incident", "What should I do after a medication error?",
     "Monitor the patient, inform the physician and report the adverse event."),
    ("fr", "incident", "Que faire après une chute d'un patient ?",
     "Évaluer la conscience, appeler le médecin et déclarer l'incident."),
    ("en", "training", "When should gloves be changed?",
     "Between patients, between dirty and clean tasks, and when damaged."),
]


def _write_jsonl(path: Path, rows: list[tuple[str, str, str, str]], prefix: str) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i, (lang, cat, question, answer) in enumerate(rows):
            handle.write(json.dumps({"id": f"{prefix}{i}", "language": lang, "category": cat,
                                     "instruction": question, "output": answer},
                                    ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def export_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(calibration, eval) JSONL files with both languages."""
    folder = tmp_path_factory.mktemp("export-data")
    calibration = _write_jsonl(folder / "train.jsonl", ROWS + ROWS[::-1], "c")
    evaluation = _write_jsonl(folder / "test.jsonl", ROWS, "t")
    return calibration, evaluation


def make_run(folder: Path, base: Path, data: tuple[Path, Path], quantization: str = "none",
             seed: int = 0) -> Path:
    """A training-run folder as `toolkit train` writes it: LoRA r8 on q/v, B perturbed so the
    adapter visibly changes logits, adapter + tokenizer, the manifest through its writer."""
    save_lora_adapter(base, folder / ADAPTER_DIR, seed=seed)
    write_run_manifest(folder, base, data=data, quantization=quantization, max_seq_len=256,
                       system_prompt=SYSTEM_PROMPT)
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
             export_data: tuple[Path, Path]) -> Path:
    return make_run(tmp_path_factory.mktemp("run"), tiny_model_dir, export_data)


def cpu_formats() -> list[ExportFormat]:
    """Every format this machine can produce (the round trips below cover each)."""
    return [f for f in ExportFormat if unavailable_reason(f) is None]


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One export of the tiny run to every format this machine can produce."""
    out = tmp_path_factory.mktemp("exports")
    return run_export(tiny_run, [f.value for f in cpu_formats()], out=out)


# --- flags and messages ----------------------------------------------------------------


def test_unknown_format_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        parse_formats(["merged", "int3", "gguf"])
    message = str(info.value)
    assert "'int3'" in message and "'gguf'" in message
    for fmt in ExportFormat:
        assert fmt.value in message
    assert parse_formats(["onnx", "merged", "onnx"]) == [ExportFormat.onnx, ExportFormat.merged]
    with pytest.raises(ConfigError, match="fp32, fp16, bf16"):
        parse_dtype("fp8")


def test_cli_bad_format_fails_before_any_work(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(tmp_path / "missing-run"), "--quantize", "int3"])
    assert result.exit_code == 2
    assert "int3" in result.output and "bnb-nf4" in result.output
    assert "Traceback" not in result.output


def _hide_module(monkeypatch: pytest.MonkeyPatch, *hidden: str) -> None:
    from toolkit import extras

    real = extras.is_available
    monkeypatch.setattr(extras, "is_available", lambda module: module not in hidden and real(module))


@pytest.mark.parametrize(("fmt", "module", "extra"), [
    ("bnb-nf4", "bitsandbytes", "bnb"), ("bnb-int8", "bitsandbytes", "bnb"),
    ("gptq-int4", "gptqmodel", "gptq"), ("gptq-int4", "optimum", "gptq"),
    ("onnx-int8", "onnxruntime", "onnx"),
])
def test_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, fmt: str,
                                             module: str, extra: str) -> None:
    _hide_module(monkeypatch, module)
    reason = unavailable_reason(ExportFormat(fmt), cuda=False)
    assert reason is not None
    assert f"--quantize {fmt}" in reason and f"pip install 'toolkit[{extra}]'" in reason


def test_format_needing_cuda_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version",
                        lambda name: "0.45.0" if name == "bitsandbytes" else real(name))
    reason = unavailable_reason(ExportFormat.bnb_nf4, cuda=False)
    assert reason is not None and "needs a CUDA GPU" in reason and "bitsandbytes>=0.46" in reason
    assert unavailable_reason(ExportFormat.bnb_nf4, cuda=True) is None


def test_nothing_producible_fails_up_front(monkeypatch: pytest.MonkeyPatch, tiny_run: Path,
                                           tmp_path: Path) -> None:
    _hide_module(monkeypatch, "bitsandbytes", "gptqmodel")
    out = tmp_path / "exports"
    result = runner.invoke(app, ["export", str(tiny_run), "--quantize", "bnb-nf4",
                                 "--quantize", "gptq-int4", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "toolkit[bnb]" in result.output and "toolkit[gptq]" in result.output
    assert not out.exists()


def test_refuses_existing_folder_without_overwrite(exported: Any, tiny_run: Path) -> None:
    out = exported.out
    before = (out / "merged" / "export_report.json").read_text()
    with pytest.raises(ExportExistsError, match="--overwrite"):
        run_export(tiny_run, ["merged"], out=out)
    result = runner.invoke(app, ["export", str(tiny_run), "--quantize", "merged",
                                 "--out", str(out)])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (out / "merged" / "export_report.json").read_text() == before


# --- merge exactness -------------------------------------------------------------------


def test_merge_matches_the_adapter_applied_model(tiny_run: Path, exported: Any) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from toolkit.export.merge import merge_adapter
    from toolkit.export.source import resolve_source

    source = resolve_source(tiny_run)
    prompts = [[1, 5, 9, 40, 41, 42, 7], [3, 100, 101, 102]]
    merged, check = merge_adapter(source, prompts)
    base = AutoModelForCausalLM.from_pretrained(source.base.path, dtype=torch.float32)
    with torch.inference_mode():
        base_logits = [base(input_ids=torch.tensor([p])).logits for p in prompts]
        adapted = PeftModel.from_pretrained(base, source.adapter_dir)
        adapter_logits = [adapted(input_ids=torch.tensor([p])).logits for p in prompts]
        merged_logits = [merged(input_ids=torch.tensor([p])).logits for p in prompts]
    effect = max(float((a - b).abs().max()) for a, b in zip(adapter_logits, base_logits))
    diff = max(float((a - m).abs().max()) for a, m in zip(adapter_logits, merged_logits))
    assert effect > 0.05  # the adapter matters, so a merge that dropped it would show
    assert diff < 1e-4 and diff == pytest.approx(check["merge_max_abs_logit_diff"], abs=1e-6)
    # what the report says is what was measured, within its tolerance
    verification = exported.outcome("merged").report.verification
    assert verification["passed"] and verification["reference"].startswith("adapter-applied")
    assert verification["max_abs_logit_diff"] <= verification["tolerance"]
    assert verification["reload_max_abs_logit_diff"] <= verification["reload_tolerance"]


def test_qlora_adapter_merges_into_the_nf4_round_trip(tmp_path: Path, tiny_model_dir: Path,
                                                      export_data: tuple[Path, Path]) -> None:
    if unavailable_reason(ExportFormat.bnb_nf4) is not None:
        pytest.skip("bitsandbytes cannot quantize on this machine")
    import torch
    from transformers import AutoModelForCausalLM

    from toolkit.export.merge import load_base_fp32, merge_adapter
    from toolkit.export.source import resolve_source

    source = resolve_source(make_run(tmp_path / "qrun", tiny_model_dir, export_data, "nf4"))
    assert source.qlora and source.compute_dtype == "bf16"
    dequantized = load_base_fp32(source)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    q_deq = dequantized.model.layers[0].self_attn.q_proj.weight
    q_orig = original.model.layers[0].self_attn.q_proj.weight
    import bitsandbytes.functional as bnbf

    # exactly bitsandbytes' NF4 round trip of the original weights, as QLoRA training saw them
    packed, state = bnbf.quantize_4bit(q_orig.detach().to(torch.bfloat16), blocksize=64,
                                       quant_type="nf4", compress_statistics=True)
    expected = bnbf.dequantize_4bit(packed, state).float()
    assert torch.equal(q_deq, expected)
    assert 0 < float((q_deq - q_orig).abs().max()) < 0.2 * float(q_orig.abs().max())
    merged, check = merge_adapter(source, [[1, 5, 9, 40, 41]])
    assert check["merge_max_abs_logit_diff"] <= check["tolerance"]
    delta = merged.model.layers[0].self_attn.q_proj.weight - q_deq
    assert float(delta.abs().max()) > 0  # the adapter was folded into the de-quantized weights


# --- every CPU format round-trips --------------------------------------------------------


@pytest.mark.parametrize("fmt", cpu_formats(), ids=lambda f: f.value)
def test_format_round_trips_with_a_complete_report(exported: Any, fmt: ExportFormat) -> None:
    outcome = exported.outcome(fmt)
    assert outcome.status == "ok", outcome.reason
    folder = exported.out / fmt.value
    report = json.loads((folder / "export_report.json").read_text())
    assert set(report) == set(REPORT_KEYS)
    assert report["format"] == fmt.value and report["path"] == str(folder)
    for key in ("overall", "fr", "en"):
        assert report["perplexity"][key] > 1 and report["reference_perplexity"][key] > 1
        assert report["perplexity_delta_pct"][key] is not None
    assert report["size_bytes"] >= report["weights_bytes"] > 0
    assert report["size_ratio"] == pytest.approx(
        report["weights_bytes"] / report["fp16_reference_bytes"], rel=1e-5)
    assert report["speed"]["tokens_per_s"] > 0 and report["speed"]["threads"] == 1
    assert report["export_seconds"] > 0 and report["max_model_len"] == 1024
    assert report["verification"]["passed"] and report["verification"]["generate_ok"]
    assert report["quality"]["verdict"] in ("reference", "ok", "degraded")
    assert set(report["vllm"]) >= {"loadable", "quantization", "reason"}
    assert report["engine_hint"] and report["system_prompt"] == SYSTEM_PROMPT
    assert report["eval_data"]["by_language"] == {"en": 3, "fr": 3}
    assert "## Evaluation" in (folder / "README.md").read_text()
    assert not [p for p in exported.out.iterdir() if p.name.startswith(".")]
    assert (exported.out / "export.log").is_file()  # third-party chatter, not the console
    # reload through the shared loader and generate
    loaded = load_export(folder)
    assert loaded.format is fmt and loaded.report.format is fmt
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Bonjour"}], tokenize=False, add_generation_prompt=True)
    prompt = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = loaded.generate(list(prompt), 5, stop_at_eos=False)
    assert len(tokens) == 5 and all(isinstance(t, int) for t in tokens)
    logits = loaded.logits_fn(np.asarray([list(prompt)], dtype=np.int64))
    assert logits.shape == (1, len(prompt), len(loaded.tokenizer))
    if fmt in (ExportFormat.onnx_int8, ExportFormat.onnx_int4):  # builder graphs: in-place KV
        from toolkit.runtime.onnx_model import OnnxCausalLM

        assert OnnxCausalLM.from_dir(folder, threads=1).is_shared_kv


def test_compare_measures_what_the_report_says(exported: Any,
                                              export_data: tuple[Path, Path]) -> None:
    """export verifies and compare scores through the same runtime: the same folder gets the
    same perplexity, under the system prompt the run was trained with."""
    import torch

    from toolkit.artifacts import read_export
    from toolkit.compare.scoring import score_variant

    formats = cpu_formats()
    fmt = ExportFormat.onnx_int8 if ExportFormat.onnx_int8 in formats else ExportFormat.merged
    folder = exported.out / fmt.value
    report = read_export(folder)
    threads = torch.get_num_threads()
    try:
        score = score_variant(str(folder), export_data[1], None, 2, 1)
    finally:
        torch.set_num_threads(threads)
    assert score.system_prompt == SYSTEM_PROMPT == report.system_prompt
    assert score.perplexity["overall"] == pytest.approx(report.perplexity["overall"], rel=1e-5)


@pytest.mark.parametrize("fmt", cpu_formats(), ids=lambda f: f.value)
def test_export_card_and_files_fit_the_hub(exported: Any, tiny_run: Path,
                                           fmt: ExportFormat) -> None:
    from huggingface_hub import ModelCard

    from toolkit.export.registry import REGISTRY

    folder = exported.out / fmt.value
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == str(exported.outcome(fmt).report.source["base_model"]["source"])
    assert data["language"] == ["fr", "en"] and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "other" and data["license_name"] == "unknown"  # a local tiny base
    assert data["library_name"] == ("onnx" if REGISTRY[fmt].family == "onnx" else "transformers")
    assert set(REGISTRY[fmt].card_tags) <= set(data["tags"])
    assert card.text.lstrip().splitlines()[0] == f"# {tiny_run.name} ({fmt.value})"
    for section in ("## Intended use and limits", "synthetic sample data", "clinician",
                    "## Evaluation", "| perplexity |", "## How to load", "## Licence"):
        assert section in card.text, section
    loader = "ORTModelForCausalLM" if REGISTRY[fmt].family == "onnx" else "AutoModelForCausalLM"
    assert loader in card.text
    assert ("vllm serve" in card.text) == (fmt in (ExportFormat.merged, ExportFormat.gptq_int4,
                                                 ExportFormat.ct_w8a8, ExportFormat.ct_w4a16))
    # no load-time leftovers
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert not {"local_files_only", "is_local"} & set(tokenizer_config)
    assert tokenizer_config["model_max_length"] == 1024
    config = json.loads((folder / "config.json").read_text())
    if REGISTRY[fmt].family == "onnx":
        assert config["dtype"] == "float32"
    generation = json.loads((folder / "generation_config.json").read_text())
    merged_generation = json.loads((exported.out / "merged" / "generation_config.json").read_text())
    assert generation.get("do_sample") == merged_generation.get("do_sample")
    assert not list(Path("logs").glob("gptq_log_*"))


def test_quantized_formats_are_measured_against_merged(exported: Any) -> None:
    merged = exported.outcome("merged").report
    for outcome in exported.outcomes:
        if outcome.format is ExportFormat.merged:
            continue
        report = outcome.report
        assert report.reference_perplexity["overall"] == pytest.approx(
            merged.perplexity["overall"])
        assert report.fp16_reference_bytes == merged.fp16_reference_bytes
        if report.quantization.get("bits") == 4:
            assert report.weights_bytes < merged.weights_bytes
    if ExportFormat.gptq_int4 in cpu_formats():
        gptq = exported.outcome("gptq-int4").report
        assert gptq.quantization["group_size"] == 32  # inputs 64 and 128: 32 divides both
        assert gptq.calibration["by_language"] == {"en": 6, "fr": 6}
        config = json.loads((exported.out / "gptq-int4" / "config.json").read_text())
        quant = config["quantization_config"]
        assert (quant["bits"], quant["group_size"], quant["desc_act"], quant["sym"]) == (
            4, 32, False, True)  # symmetric: what vLLM's GPTQ loader takes
        assert quant["checkpoint_format"] == "gptq"
        # the kernel the measured speed ran: one of gptqmodel's quantized linear classes
        assert gptq.quantization["inference_kernel"].endswith("Linear")
        assert gptq.speed["tokens_per_s"] > 0
    if ExportFormat.onnx in cpu_formats():
        check = exported.outcome("onnx").report.verification
        assert check["max_abs_logit_diff"] <= check["tolerance"]


# --- GPTQ settings and calibration -------------------------------------------------------


@pytest.mark.parametrize(("sizes", "group"), [
    ([4096, 11008], 32), ([576, 1536], 32), ([64, 128], 32), ([48, 80], 16), ([100, 300], -1),
])
def test_gptq_group_size(sizes: list[int], group: int) -> None:
    from toolkit.export.gptq import choose_group_size

    chosen, reason = choose_group_size(sizes)
    assert chosen == group
    if group == 16:
        assert "32 does not divide input size(s) 48, 80" in reason
    assert choose_group_size([576, 1536], preferred=128) == (
        64, ("128 does not divide input size(s) 576 (the CPU kernel needs it to); 64 is the "
             "largest power of two that divides them all"))


def test_gptq_settings_read_the_architecture(tiny_model_dir: Path) -> None:
    from toolkit.export.gptq import gptq_settings, quantized_in_features

    features = quantized_in_features(tiny_model_dir)
    assert set(features.values()) == {64, 128} and not any("lm_head" in n for n in features)
    settings = gptq_settings(tiny_model_dir)
    assert settings["group_size"] == 32 and settings["bits"] == 4 and not settings["desc_act"]
    assert settings["sym"] is True  # what vLLM's GPTQ loader takes (GPTQ_REASON)


def test_calibration_renders_both_languages_as_conversations(
        tiny_model_dir: Path, export_data: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from toolkit.export.calibration import calibration_texts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts, info = calibration_texts(export_data[0], tokenizer, SYSTEM_PROMPT)
    assert len(texts) == 12 and info["by_language"] == {"en": 6, "fr": 6}
    assert info["warning"] is None
    first = texts[0]
    assert first.startswith("<|im_start|>system\n" + SYSTEM_PROMPT)
    assert "hygiène" in first and "<|im_start|>assistant\nMouiller" in first
    english_only = _write_jsonl(tmp_path / "en.jsonl", [r for r in ROWS if r[0] == "en"], "e")
    _, info = calibration_texts(english_only, tokenizer, None)
    assert "hurts the other language" in info["warning"]


def test_gptq_without_calibration_data_fails_before_any_work(
        tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        export_data: tuple[Path, Path]) -> None:
    if unavailable_reason(ExportFormat.gptq_int4) is not None:
        pytest.skip("gptqmodel is not installed")
    monkeypatch.chdir(tmp_path)  # no data/train.jsonl here
    bare = shutil.copytree(tiny_run / "adapter", tmp_path / "adapter")
    out = tmp_path / "exports"
    with pytest.raises(DataError, match="calibration"):
        run_export(bare, ["gptq-int4"], out=out, calibration=tmp_path / "nope.jsonl",
                   eval_data=export_data[1])
    assert not out.exists()


# --- atomic writes -------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_failed_export_leaves_no_folder_and_the_old_one_intact(
        exported: Any, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        failure: type[BaseException]) -> None:
    import toolkit.export.runner as runner_module

    out = tmp_path / "exports"
    shutil.copytree(exported.out / "merged", out / "merged")
    shutil.copytree(exported.out / "merged", out / "bnb-int8")  # stands for an older export
    old = {p.name: p.read_bytes() for p in (out / "bnb-int8").iterdir()}
    real = runner_module.get_exporter

    def exploding(fmt: ExportFormat) -> Any:
        if fmt is not ExportFormat.bnb_int8:
            return real(fmt)

        def export(ctx: Any, work: Path) -> Any:
            (work / "model.safetensors").write_bytes(b"partial")
            raise failure("simulated failure mid-export")

        return export

    monkeypatch.setattr(runner_module, "get_exporter", exploding)
    if failure is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            run_export(tiny_run, ["bnb-int8"], out=out, overwrite=True)
    else:
        result = run_export(tiny_run, ["bnb-int8"], out=out, overwrite=True)
        assert not result.complete
        assert result.outcome("bnb-int8").status == "failed"
        assert "simulated failure" in result.outcome("bnb-int8").reason
    # the log of the failed attempt stays beside the format folders (toolkit.logs)
    assert sorted(p.name for p in out.iterdir()) == ["bnb-int8", "export.log", "merged"]
    assert {p.name: p.read_bytes() for p in (out / "bnb-int8").iterdir()} == old


# --- the CLI as users type it ---------------------------------------------------------------


def test_cli_skips_what_this_machine_cannot_make_and_exits_1(
        exported: Any, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_module(monkeypatch, "gptqmodel")
    out = tmp_path / "exports"
    shutil.copytree(exported.out / "merged", out / "merged")  # same adapter: reused
    result = runner.invoke(app, ["export", str(tiny_run), "--quantize", "merged",
                                 "--quantize", "gptq-int4", "--out", str(out), "--overwrite"])
    assert result.exit_code == 1, result.output
    assert "skipped" in result.output and "toolkit[gptq]" in result.output
    for header in ("format", "size", "vs fp16", "ppl", "fr", "en", "Δ ppl", "tok/s", "time"):
        assert header in result.output
    assert (out / "merged" / "export_report.json").is_file() and not (out / "gptq-int4").exists()


def test_bare_adapter_folder_is_a_source(tiny_run: Path, tiny_model_dir: Path) -> None:
    from toolkit.export.source import resolve_source

    source = resolve_source(tiny_run / "adapter")
    assert source.run_dir is None and source.base.path == tiny_model_dir.resolve()
    assert source.default_out == tiny_run / "exports"
    with pytest.raises(ToolkitError, match="peft adapter folder"):
        resolve_source(tiny_model_dir)


def test_trained_adapter_records_the_portable_base(tiny_run: Path, tiny_model_dir: Path,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A run on `embedded:...` writes that id, not this machine's cache path, and every
    loader of the base resolves it through model_source."""
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from toolkit import model_source
    from toolkit.export.source import resolve_source
    from toolkit.model_source import ResolvedModel
    from toolkit.train.adapter import finish_adapter

    monkeypatch.setattr(model_source, "embedded_model_dir", lambda name: tiny_model_dir)
    adapter = shutil.copytree(tiny_run / "adapter", tmp_path / "adapter")
    base = ResolvedModel("embedded:smollm2-135m", tiny_model_dir, None, "embedded")
    manifest = {"toolkit_version": "0.1.0", "steps": 3, "tokens_per_s": 10.0,
                "device": {"type": "cpu", "precision": "fp32"},
                "data": {"train": {"path": "data/train.jsonl", "examples": 12, "sha256": "ab"}},
                "metrics": {"before": {"overall": 9.5, "by_language": {"fr": 9.0, "en": 10.0}},
                            "after": {"overall": 4.25, "by_language": {"fr": 4.0, "en": 4.5}}}}
    finish_adapter(adapter, base, manifest, "demo")

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "embedded:smollm2-135m"
    tokenizer_config = json.loads((adapter / "tokenizer_config.json").read_text())
    assert not {"local_files_only", "is_local"} & set(tokenizer_config)
    assert tokenizer_config["model_max_length"] == 1024
    card = ModelCard.load(adapter / "README.md")
    assert "[More Information Needed]" not in card.text and "| after | 4.25 | 4.00 | 4.50 |" in card.text
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["license"] == "apache-2.0" and data["library_name"] == "peft"
    assert data["language"] == ["fr", "en"] and data["pipeline_tag"] == "text-generation"
    # export and serve resolve the portable id, and peft loads the adapter on that base
    source = resolve_source(adapter)
    assert source.base.kind == "embedded" and source.base.path == tiny_model_dir
    from toolkit.serve.select import _from_adapter

    assert _from_adapter(adapter, "demo").path == tiny_model_dir
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source.base.path),
                                      adapter)
    assert model.peft_config["default"].r == 8


# --- vLLM loadability ----------------------------------------------------------------------


def test_vllm_support_is_checked_against_the_installed_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    from toolkit.export import vllm_compat
    from toolkit.export.vllm_compat import VllmInfo, engine_hint, vllm_support

    cpu = VllmInfo("python", "0.32.0", "cpu", ("awq", "gptq", "compressed-tensors"))
    bnb = vllm_support(ExportFormat.bnb_nf4, cpu)
    assert not bnb["loadable"] and "no bitsandbytes method" in bnb["reason"] and bnb["checked"]
    monkeypatch.setattr(vllm_compat, "cpu_has_avx512", lambda: False)
    gptq = vllm_support(ExportFormat.gptq_int4, cpu)
    assert not gptq["loadable"] and "AVX512" in gptq["reason"]
    monkeypatch.setattr(vllm_compat, "cpu_has_avx512", lambda: True)
    assert vllm_support(ExportFormat.gptq_int4, cpu)["loadable"]
    gpu = VllmInfo("python", "0.11.0", "cuda", ("gptq", "bitsandbytes"))
    assert vllm_support(ExportFormat.bnb_int8, gpu)["quantization"] == "bitsandbytes"
    assert engine_hint(ExportFormat.bnb_int8, vllm_support(ExportFormat.bnb_int8, gpu)) == [
        "vllm", "transformers"]
    absent = vllm_support(ExportFormat.merged, "no vLLM configured here")
    assert not absent["loadable"] and not absent["checked"]
    assert engine_hint(ExportFormat.merged, absent) == ["transformers"]
    monkeypatch.setattr(toolkit.cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    w8a8 = vllm_support(ExportFormat.ct_w8a8, cpu)
    assert w8a8["loadable"] and "saturate" in w8a8["warning"] and "onnx-w8a8" in w8a8["warning"]
    cuda = VllmInfo("python", "0.32.0", "cuda", ("compressed-tensors",))
    assert vllm_support(ExportFormat.ct_w8a8, cuda)["loadable"]
    assert "warning" not in vllm_support(ExportFormat.ct_w8a8, cuda)
    monkeypatch.setattr(toolkit.cpu, "cpu_flags", lambda: frozenset({"avx2", "avx_vnni"}))
    assert "warning" not in vllm_support(ExportFormat.ct_w8a8, cpu)
    onnx = vllm_support(ExportFormat.onnx_int8, cpu)
    assert not onnx["loadable"] and engine_hint(ExportFormat.onnx_int8, onnx) == ["onnxruntime"]
