"""`run_training` end to end on the tiny model: learning, manifest, adapter, resume, 2 processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.train_helpers import make_config, write_yaml
from toolkit.train import MANIFEST_KEYS, read_manifest, run_training

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
                 train_data: tuple[Path, Path]) -> Any:
    """One 3-epoch packed run shared by the tests that only read its results."""
    cfg = make_config(tiny_model_dir, train_data, epochs=3, precision="fp16")
    return run_training(cfg, tmp_path_factory.mktemp("runs") / "tiny")


def test_third_party_output_is_in_the_run_log(finished_run: Any) -> None:
    assert (finished_run.run_dir / "train.log").is_file()


def test_loss_decreases(finished_run: Any) -> None:
    epochs = finished_run.manifest["metrics"]["epochs"]
    assert [e["epoch"] for e in epochs] == [1.0, 2.0, 3.0]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert finished_run.after["loss"] < finished_run.before["loss"] - 0.05
    assert finished_run.after["overall"] < finished_run.before["overall"]
    assert set(finished_run.after["by_language"]) == {"fr", "en"}
    assert epochs[-1]["eval"] == finished_run.after


def test_manifest_has_every_promised_field(finished_run: Any, tiny_model_dir: Path,
                                           train_data: tuple[Path, Path]) -> None:
    from toolkit.model_source import resolve_model
    from toolkit.train.model import cpu_has_native_bf16

    manifest = read_manifest(finished_run.run_dir)
    assert manifest == json.loads(json.dumps(finished_run.manifest))
    assert set(MANIFEST_KEYS) <= set(manifest)
    assert manifest["config"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert manifest["base_model"] == {"source": str(tiny_model_dir), "path": str(tiny_model_dir),
                                      "revision": None, "kind": "local"}
    resolved = resolve_model(manifest["base_model"]["source"], manifest["base_model"]["revision"])
    assert resolved.path == tiny_model_dir
    for role, path in zip(("train", "eval"), train_data):
        entry = manifest["data"][role]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["examples"] == len(path.read_text().splitlines())
    assert set(manifest["versions"]) >= {"torch", "transformers", "peft", "accelerate", "python"}
    assert all(manifest["versions"].values())
    # fp16 was asked for; a CPU trains in bf16 where it has native bf16, else fp32, and says so
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert manifest["device"]["type"] == "cpu" and manifest["device"]["precision"] == expected
    assert manifest["device"]["requested_precision"] == "fp16"
    assert manifest["device"]["threads"] == 1
    assert manifest["world_size"] == 1 and manifest["packing"] is True
    metrics = manifest["metrics"]
    assert set(metrics) == {"before", "epochs", "after"}
    assert {"overall", "loss", "tokens", "by_language", "by_category"} <= set(metrics["before"])
    assert manifest["steps"] > 0 and manifest["truncated_examples"] == 0
    assert manifest["tokens_per_s"] > 0 and manifest["wall_time_s"] >= manifest["train_time_s"] > 0
    assert manifest["peak_memory_bytes"] > 50 * 2**20
    assert manifest["created"].endswith("+00:00")
    assert manifest["chat_template_added"] is False
    assert (finished_run.run_dir / manifest["checkpoint_dir"]).is_dir()


def test_adapter_loads_with_its_chat_template(finished_run: Any, tiny_model_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = finished_run.adapter_dir
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert "<|im_start|>" in tokenizer.chat_template
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = base(input_ids=torch.tensor([[1, 2, 3]])).logits
    model = PeftModel.from_pretrained(base, adapter).eval()
    tuned = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert not torch.allclose(reference, tuned)  # the adapter changes the model
    assert not (adapter / "training_args.bin").exists()


def test_adapter_folder_is_portable_and_has_a_card(finished_run: Any,
                                                  tiny_model_dir: Path) -> None:
    import json

    from huggingface_hub import ModelCard

    adapter = finished_run.adapter_dir
    config = json.loads((adapter / "adapter_config.json").read_text())
    # a local base records its folder; an embedded or hub base its id (test_export covers it)
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    tokenizer_config = json.loads((adapter / "tokenizer_config.json").read_text())
    assert not {"local_files_only", "is_local"} & set(tokenizer_config)
    card = ModelCard.load(adapter / "README.md")
    assert "[More Information Needed]" not in card.text
    assert card.data.library_name == "peft" and card.data.language == ["fr", "en"]
    assert card.data.pipeline_tag == "text-generation" and card.data.license
    assert f"| after | {finished_run.after['overall']:.2f} |" in card.text


def test_no_work_folder_left_behind(finished_run: Any) -> None:
    siblings = sorted(p.name for p in finished_run.run_dir.parent.iterdir())
    assert siblings == ["tiny"]


def test_template_less_base_gets_the_default_template(
        tmp_path: Path, tiny_model_dir: Path, train_data: tuple[Path, Path]) -> None:
    import shutil

    from transformers import AutoTokenizer

    from toolkit.data.prompts import DEFAULT_CHAT_TEMPLATE

    base = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    assert not AutoTokenizer.from_pretrained(base).chat_template
    cfg = make_config(base, train_data, max_steps=1, epochs=1)
    result = run_training(cfg, tmp_path / "run")
    assert result.manifest["chat_template_added"] is True
    assert AutoTokenizer.from_pretrained(result.adapter_dir).chat_template == DEFAULT_CHAT_TEMPLATE


class Interrupt(Exception):
    """Stands for Ctrl-C in the middle of training."""


def test_interrupted_run_resumes_from_its_checkpoint(
        tmp_path: Path, tiny_model_dir: Path, train_data: tuple[Path, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from toolkit.train.trainer import ToolkitTrainer

    cfg = make_config(tiny_model_dir, train_data, epochs=2, packing=False)  # 4 steps an epoch
    target = tmp_path / "run"
    original = ToolkitTrainer.compute_loss

    def failing(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.state.global_step == 5:  # in the second step of epoch 2
            raise Interrupt()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ToolkitTrainer, "compute_loss", failing)
    with pytest.raises(Interrupt):
        run_training(cfg, target)
    monkeypatch.setattr(ToolkitTrainer, "compute_loss", original)
    work = tmp_path / ".run.partial"
    assert not target.exists()  # never half-written
    assert (work / "checkpoints" / "checkpoint-4").is_dir()

    resumed = run_training(cfg, target, resume=True)
    manifest = resumed.manifest
    assert manifest["resumed_from_step"] == 4 and manifest["steps"] == 8
    assert [e["step"] for e in manifest["metrics"]["epochs"]] == [4, 8]
    assert manifest["metrics"]["before"]["loss"] > manifest["metrics"]["after"]["loss"]
    # the whole run's tokens and time, not this invocation's: 2 epochs, the step of epoch 2
    # lost to the interruption counted once
    epochs = manifest["metrics"]["epochs"]
    assert epochs[0]["train_tokens"] > 0
    assert manifest["train_tokens"] == epochs[1]["train_tokens"] == 2 * epochs[0]["train_tokens"]
    assert manifest["train_time_s"] >= epochs[1]["train_time_s"] > epochs[0]["train_time_s"] > 0
    assert manifest["tokens_per_s"] == pytest.approx(manifest["train_tokens"] / manifest["train_time_s"], rel=0.02)
    assert not work.exists() and (target / "checkpoints" / "checkpoint-8").is_dir()

    # resuming the finished run with nothing left to train keeps it as it is
    before = (target / "manifest.json").read_text()
    again = run_training(cfg, target, resume=True)
    assert (target / "manifest.json").read_text() == before
    assert again.manifest == json.loads(before) and again.manifest["train_tokens"] > 0
    assert not work.exists()

    # a finished run continues too: one more epoch, and the old run stays until the end
    cfg.training.epochs = 3
    more = run_training(cfg, target, resume=True)
    assert more.manifest["resumed_from_step"] == 8 and more.manifest["steps"] == 12
    assert [e["step"] for e in more.manifest["metrics"]["epochs"]] == [4, 8, 12]
    assert more.manifest["train_tokens"] == 3 * epochs[0]["train_tokens"]
    assert more.manifest["metrics"]["before"] == manifest["metrics"]["before"]


def test_resume_refuses_another_lora_recipe(
        tmp_path: Path, tiny_model_dir: Path, train_data: tuple[Path, Path]) -> None:
    from toolkit.errors import ConfigError

    cfg = make_config(tiny_model_dir, train_data, max_steps=1, epochs=1)
    run_training(cfg, tmp_path / "run")
    cfg.lora.r = 4
    with pytest.raises(ConfigError, match="lora"):
        run_training(cfg, tmp_path / "run", resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overwrite_replaces_the_run_only_at_the_end(
        tmp_path: Path, tiny_model_dir: Path, train_data: tuple[Path, Path]) -> None:
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old run")
    cfg = make_config(tiny_model_dir, train_data, max_steps=1, epochs=1)
    result = run_training(cfg, target, overwrite=True)
    assert not (target / "old.txt").exists() and (target / "manifest.json").is_file()
    assert result.manifest["steps"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _row_lengths(model_dir: Path, data: tuple[Path, Path]) -> list[int]:
    from transformers import AutoTokenizer

    from toolkit.config import DataSection
    from toolkit.data.schema import load_examples
    from toolkit.train.dataset import encode_split, pack_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    split = encode_split(tokenizer, data[0], load_examples(data[0]), DataSection().system_prompt,
                         512)
    return [row.length for row in pack_rows(split.examples, 512, seed=42)]


def test_two_processes_train_one_adapter(tmp_path: Path, tiny_model_dir: Path,
                                         train_data: tuple[Path, Path]) -> None:
    """torchrun over gloo (accelerate's --cpu launcher silently runs one process)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = write_yaml(tmp_path / "tiny.yaml",
                        make_config(tiny_model_dir, train_data, max_steps=2, batch_size=2))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOOLKIT_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "runs" / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "toolkit", "train", "--config", str(config),
               "--output", str(out)]
    done = subprocess.run(command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest["world_size"] == 2 and manifest["device"]["world_size"] == 2
    assert manifest["steps"] == 2
    # both ranks trained: 2 steps x 2 rows each, more tokens than one process could see
    one_rank_max = sum(sorted(_row_lengths(tiny_model_dir, train_data), reverse=True)[:4])
    assert manifest["train_tokens"] > one_rank_max
    assert done.stdout.count("training summary") == 1  # rank 0 alone reports
    assert sorted(p.name for p in out.parent.iterdir()) == ["ddp"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      out / "adapter")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_micro_batches_share_one_token_normalised_loss(
        tmp_path: Path, tiny_model_dir: Path, train_data: tuple[Path, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU a batch runs one row at a time; the loss still divides by the whole batch."""
    from toolkit.train.trainer import ToolkitTrainer

    original = ToolkitTrainer.compute_loss
    seen: list[tuple[int, int]] = []

    def spy(self: Any, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
            num_items_in_batch: Any = None) -> Any:
        seen.append((int((inputs["labels"][:, 1:] != -100).sum()), int(num_items_in_batch)))
        return original(self, model, inputs, return_outputs, num_items_in_batch)

    monkeypatch.setattr(ToolkitTrainer, "compute_loss", spy)
    cfg = make_config(tiny_model_dir, train_data, max_steps=1, epochs=1, batch_size=4)
    manifest = run_training(cfg, tmp_path / "run").manifest
    assert manifest["device"]["micro_batch_rows"] == 1
    assert manifest["device"]["accumulation_steps"] == 4
    assert len(seen) == 4
    assert {total for _, total in seen} == {sum(own for own, _ in seen)}
