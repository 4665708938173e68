"""Training building blocks on the tiny model: labels, packing, model checks, bad input.

End-to-end runs (loss, resume, manifest, two processes) are in test_train_run.py.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.train_helpers import (
    make_config,
    write_yaml,
)
from toolkit.cli import app
from toolkit.data.prompts import IGNORE_INDEX
from toolkit.errors import ConfigError, UnsupportedHardwareError

runner = CliRunner()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- labels and packing -------------------------------------------------------------------

def test_only_response_tokens_carry_loss(tokenizer: Any, train_data: tuple[Path, Path]) -> None:
    from toolkit.data.schema import load_examples
    from toolkit.train.dataset import encode_split

    examples = load_examples(train_data[0])
    split = encode_split(tokenizer, train_data[0], examples, "Be careful.", 512)
    assert split.truncated == 0 and not split.dropped
    for item in split.examples:
        labelled = [i for i, label in enumerate(item.labels) if label != IGNORE_INDEX]
        # one contiguous block that starts right after the prompt and runs to the end
        assert labelled == list(range(item.prompt_len, len(item.input_ids)))
        assert [item.labels[i] for i in labelled] == item.input_ids[item.prompt_len:]
        answer = tokenizer.decode(item.input_ids[item.prompt_len:])
        assert answer.startswith(item.example.output)
        assert answer.rstrip("\n").endswith(tokenizer.eos_token)  # the template's last "\n" too
        prompt = tokenizer.decode(item.input_ids[:item.prompt_len])
        assert "Be careful." in prompt and item.example.instruction in prompt
        assert prompt.endswith("<|im_start|>assistant\n")


def test_truncation_is_counted_and_answerless_examples_dropped(
        tokenizer: Any, train_data: tuple[Path, Path]) -> None:
    from toolkit.data.schema import load_examples
    from toolkit.train.dataset import encode_split

    examples = load_examples(train_data[0])
    lengths = [len(e.input_ids) for e in encode_split(tokenizer, train_data[0], examples, None,
                                                      4096).examples]
    prompt_only = min(lengths) - 5
    split = encode_split(tokenizer, train_data[0], examples, None, prompt_only)
    assert split.truncated == len(examples)
    assert all(len(e.input_ids) <= prompt_only for e in split.examples)
    assert len(split.examples) + len(split.dropped) == len(examples)


def test_collator_pads_dynamically_and_restarts_positions(
        tokenizer: Any, train_data: tuple[Path, Path]) -> None:
    from toolkit.data.schema import load_examples
    from toolkit.train.dataset import (
        RowCollator,
        encode_split,
        pack_rows,
        unpacked_rows,
    )

    split = encode_split(tokenizer, train_data[0], load_examples(train_data[0]), None, 512)
    rows = unpacked_rows(split.examples[:3])
    batch = RowCollator(tokenizer.pad_token_id, packed=False)(rows)
    assert batch["input_ids"].shape[1] == max(r.length for r in rows)  # longest, not max_seq_len
    assert batch["attention_mask"].sum().item() == batch["num_tokens"].item()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()

    packed = pack_rows(split.examples, 512, seed=0)
    assert sum(len(r.segments) for r in packed) == len(split.examples)
    assert all(r.length <= 512 for r in packed) and len(packed) < len(split.examples)
    batch = RowCollator(tokenizer.pad_token_id, packed=True)(packed[:2])
    assert "attention_mask" not in batch
    row = packed[0]
    starts = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0]
    expected, offset = [], 0
    for segment in row.segments:
        expected.append(offset)
        offset += len(segment.input_ids)
    assert starts[:len(row.segments)] == expected
    assert batch["num_tokens"].item() == packed[0].length + packed[1].length


def _segment_losses(labels: Any, logits: Any, starts: list[list[int]]) -> list[float]:
    import torch.nn.functional as F

    losses = []
    for b, row_starts in enumerate(starts):
        bounds = row_starts + [labels.shape[1]]
        for start, end in itertools.pairwise(bounds):
            target = labels[b, start + 1:end]
            mask = target != IGNORE_INDEX
            if mask.any():
                losses.append(F.cross_entropy(logits[b, start:end - 1][mask], target[mask]).item())
    return losses


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # eager: what CPU bf16 trains with
def test_packing_gives_the_unpacked_loss(tiny_model_dir: Path, tokenizer: Any,
                                         train_data: tuple[Path, Path], attention: str) -> None:
    import torch

    from toolkit.data.schema import load_examples
    from toolkit.train.dataset import Row, RowCollator, encode_split, pack_rows
    from toolkit.train.model import load_base, resolve_hardware

    cfg = make_config(tiny_model_dir, train_data)
    model = load_base(cfg, tiny_model_dir, resolve_hardware(cfg)).eval()
    model.set_attn_implementation(attention)
    assert model.config.use_cache is False  # a KV cache would disable packed-mask detection
    split = encode_split(tokenizer, train_data[0], load_examples(train_data[0]), None, 512)
    rows = pack_rows(split.examples, 512, seed=0)
    assert max(len(r.segments) for r in rows) >= 3
    batch = RowCollator(tokenizer.pad_token_id, packed=True)(rows)
    starts = [[i for i, p in enumerate(r) if p == 0] for r in batch["position_ids"].tolist()]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        packed = _segment_losses(batch["labels"], logits, starts)
        # the same rows with one causal mask over the whole row: examples see each other
        leaky = _segment_losses(batch["labels"], model(input_ids=batch["input_ids"]).logits, starts)
        alone = []
        for row in rows:
            for segment in row.segments:
                single = RowCollator(tokenizer.pad_token_id, packed=False)([Row((segment,))])
                out = model(input_ids=single["input_ids"], attention_mask=single["attention_mask"])
                alone += _segment_losses(single["labels"], out.logits, [[0]])
    assert len(packed) == len(alone) == len(split.examples)
    assert max(abs(a - b) for a, b in zip(packed, alone)) < 1e-4
    assert max(abs(a - b) for a, b in zip(leaky, alone)) > 1e-3  # the check can see leakage


# --- model and hardware checks ------------------------------------------------------------

def test_unknown_target_module_lists_linear_modules(tiny_model_dir: Path,
                                                    train_data: tuple[Path, Path]) -> None:
    from toolkit.train.model import check_model_config

    cfg = make_config(tiny_model_dir, train_data)
    cfg.lora.target_modules = ["q_proj", "query_key_value"]
    with pytest.raises(ConfigError) as err:
        check_model_config(cfg, tiny_model_dir)
    message = str(err.value)
    assert "query_key_value" in message and "q_proj, " not in message.split(":")[1]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message


@pytest.mark.parametrize(("requested", "native_bf16", "runs", "warns"), [
    ("fp32", True, "fp32", False),
    ("fp32", False, "fp32", False),
    ("bf16", True, "bf16", False),
    ("bf16", False, "fp32", True),
    ("fp16", True, "bf16", True),
    ("fp16", False, "fp32", True),
])
def test_cpu_precision_is_what_the_cpu_computes_fast(requested: str, native_bf16: bool,
                                                     runs: str, warns: bool) -> None:
    from toolkit.config import Precision
    from toolkit.train.model import cpu_hardware

    hardware = cpu_hardware("test cpu", Precision(requested), native_bf16)
    assert hardware.device == "cpu" and hardware.precision is Precision(runs)
    assert hardware.requested is Precision(requested)
    if warns:  # one line that says what runs instead
        assert hardware.warning and "\n" not in hardware.warning and runs in hardware.warning
        assert f"training.precision: {requested}" in hardware.warning
    else:
        assert hardware.warning is None


def test_cpu_bf16_loads_a_bf16_base_with_eager_attention(
        tiny_model_dir: Path, train_data: tuple[Path, Path]) -> None:
    import torch

    from toolkit.config import Precision
    from toolkit.train.model import Hardware, load_base

    cfg = make_config(tiny_model_dir, train_data, precision="bf16")
    model = load_base(cfg, tiny_model_dir, Hardware("cpu", "c", Precision.bf16, Precision.bf16))
    assert model.config._attn_implementation == "eager"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    fp32 = load_base(cfg, tiny_model_dir, Hardware("cpu", "c", Precision.fp32, Precision.bf16))
    assert fp32.config._attn_implementation == "sdpa"
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}


def test_fp16_on_this_cpu_falls_back_with_one_warning(tiny_model_dir: Path,
                                                      train_data: tuple[Path, Path]) -> None:
    from toolkit.config import Precision
    from toolkit.train.model import cpu_has_native_bf16, resolve_hardware

    hardware = resolve_hardware(make_config(tiny_model_dir, train_data, precision="fp16"))
    expected = Precision.bf16 if cpu_has_native_bf16() else Precision.fp32
    assert hardware.device == "cpu" and hardware.precision is expected
    assert hardware.requested is Precision.fp16
    assert hardware.warning and "\n" not in hardware.warning and expected.value in hardware.warning


def test_qlora_without_cuda_fails_before_loading(tiny_model_dir: Path,
                                                 train_data: tuple[Path, Path]) -> None:
    from toolkit.train.model import resolve_hardware

    cfg = make_config(tiny_model_dir, train_data, precision="bf16", quantization="nf4")
    with pytest.raises(UnsupportedHardwareError, match="CUDA"):
        resolve_hardware(cfg)


# --- bad input through the CLI: one line, exit 1, nothing written -------------------------

def _bad_runs(tmp_path: Path, model_dir: Path, data: tuple[Path, Path]) -> dict[str, tuple]:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    invalid = tmp_path / "invalid.jsonl"
    invalid.write_text(json.dumps({"id": "x", "language": "de", "instruction": "?"}) + "\n",
                       encoding="utf-8")
    existing = tmp_path / "runs" / "existing"
    existing.mkdir(parents=True)
    config = write_yaml(tmp_path / "tiny.yaml", make_config(model_dir, data))
    base = ["train", "--config", str(config)]
    return {
        "missing data": (base + ["--data", str(tmp_path / "nope.jsonl")], "no such train data"),
        "empty data": (base + ["--data", str(empty)], "empty"),
        "invalid data": (base + ["--eval-data", str(invalid)], "toolkit data validate"),
        "output exists": (base + ["--output", str(existing)], "--overwrite"),
        "unknown target": (base + ["lora.target_modules=[q_proj,qkv]"], "k_proj"),
        "qlora on cpu": (base + ["training.quantization=nf4", "training.precision=bf16"], "CUDA"),
        "seq len": (base + ["training.max_seq_len=100000"], "max_position_embeddings"),
        "resume nothing": (base + ["--resume"], "no checkpoint"),
        "bad override": (base + ["training.batch_size=0"], "batch_size"),
    }


@pytest.mark.parametrize("case", ["missing data", "empty data", "invalid data", "output exists",
                                  "unknown target", "qlora on cpu", "seq len", "resume nothing",
                                  "bad override"])
def test_bad_input_is_one_line_exit_1_nothing_written(
        case: str, tmp_path: Path, tiny_model_dir: Path, train_data: tuple[Path, Path]) -> None:
    args, expected = _bad_runs(tmp_path, tiny_model_dir, train_data)[case]
    output = tmp_path / "runs" / "new"
    if "--output" not in args:
        args = args + ["--output", str(output)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in result.output, result.output
    assert "Traceback" not in result.output
    assert not output.exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["existing"]
    assert not list((tmp_path / "runs" / "existing").iterdir())


def test_training_evaluation_matches_the_shared_perplexity(
        tiny_model_dir: Path, tokenizer: Any, train_data: tuple[Path, Path]) -> None:
    """The faster in-training scorer gives the numbers export and compare will report."""
    from transformers import AutoModelForCausalLM

    from toolkit.data.schema import load_examples
    from toolkit.evaluation import perplexity, torch_logits_fn
    from toolkit.train.dataset import encode_split
    from toolkit.train.evaluate import evaluate_split

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    path = train_data[1]
    split = encode_split(tokenizer, path, load_examples(path), "Be careful.", 512).examples
    ours = evaluate_split(model, split)
    shared = perplexity(torch_logits_fn(model), split)
    assert ours.tokens == shared.tokens
    assert abs(ours.loss - shared.loss) < 1e-4
    assert ours.by_language.keys() == shared.by_language.keys() == {"fr", "en"}
    for key in shared.by_language:
        assert abs(ours.by_language[key] - shared.by_language[key]) < 1e-3 * shared.by_language[key]
    assert set(ours.by_category) == set(shared.by_category)


def test_reading_a_manifest_imports_no_torch(tmp_path: Path) -> None:
    """Export and serve read manifests; that must stay instant."""
    import subprocess
    import sys

    code = ("import sys; from toolkit.train import read_manifest, run_training; "
            "print([m for m in ('torch', 'transformers', 'peft') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_read_manifest_errors_are_one_line(tmp_path: Path) -> None:
    from toolkit.errors import ToolkitError
    from toolkit.train import read_manifest

    with pytest.raises(ToolkitError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ToolkitError, match="not valid JSON"):
        read_manifest(tmp_path)
