"""Training throughput: toolkit's trainer vs a plain transformers `Trainer` + peft baseline.

Both variants train the same base, LoRA recipe and data (the same encoded examples, answer
tokens only in the loss) for the same number of optimizer steps with the same batch size,
gradient accumulation, learning rate and seed. They differ in what toolkit adds:

- toolkit: packing (several examples per row, block-diagonal attention, no pad tokens),
  a loss that projects only answer positions onto the vocabulary, and, for a bf16 config on
  a CPU with native bf16 (AVX512-BF16/AMX), the frozen base stored in bf16;
- baseline: one example per row, the model's own loss over full logits, the same precision
  the plain Trainer way (`bf16=True`: autocast over the fp32 weights), and one of the two
  paddings a plain script gets: `max_length` (`tokenizer(..., padding="max_length")` and
  `default_data_collator`, the seed's style: every row padded to max_seq_len) and
  `longest` (`DataCollatorForSeq2Seq`'s default `padding=True`: to the longest row of each
  batch). Both run by default (`--baselines`).

Each variant runs in its own spawned process, so peak RSS (ru_maxrss of that process) is
its own. tokens/s counts non-pad tokens over training time only (evaluation excluded).
The final eval loss is the answer-token loss on the held-out file, computed for both by
`toolkit.train.evaluate.evaluate_split`.

    .venv/bin/python benchmarks/train_throughput.py [--steps 2] [--threads 2] [--precision fp32] [--save]

Target: toolkit >= 1.5x the baseline's tokens/s at equal (or lower) eval loss, with peak
RSS no higher. Against `longest` the gain is bounded by that baseline's padding share plus
the prompt logits it computes; the printout says how much padding each baseline carried.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _config(args: argparse.Namespace) -> Any:
    from toolkit.config import load_config

    overrides = [f"training.max_steps={args.steps}", f"training.threads={args.threads}",
                 f"data.train={args.data}", f"data.eval={args.eval_data}"]
    if args.precision:
        overrides.append(f"training.precision={args.precision}")
    if args.max_seq_len:
        overrides.append(f"training.max_seq_len={args.max_seq_len}")
    return load_config(Path(args.config), overrides)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_toolkit(args: argparse.Namespace) -> dict[str, Any]:
    """toolkit's trainer, as `toolkit train` runs it (packing as the config says)."""
    import torch

    from toolkit.train import run_training

    torch.set_num_threads(args.threads)
    cfg = _config(args)
    cfg.training.packing = True
    with tempfile.TemporaryDirectory() as tmp:
        result = run_training(cfg, Path(tmp) / "run")
    manifest = result.manifest
    return {
        "tokens_per_s": manifest["tokens_per_s"], "train_tokens": manifest["train_tokens"],
        "train_time_s": manifest["train_time_s"], "steps": manifest["steps"],
        "eval_loss": manifest["metrics"]["after"]["loss"],
        "eval_loss_before": manifest["metrics"]["before"]["loss"],
        "precision": manifest["device"]["precision"], "threads": torch.get_num_threads(), "peak_rss_bytes": _peak_rss(),
    }


def run_baseline(args: argparse.Namespace, padding: str) -> dict[str, Any]:
    """A plain `Trainer` + peft over padded single-example rows."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from toolkit.data.prompts import ensure_chat_template
    from toolkit.model_source import resolve_model
    from toolkit.train.dataset import encode_split, load_split
    from toolkit.train.evaluate import evaluate_split
    from toolkit.train.model import resolve_hardware

    torch.set_num_threads(args.threads)
    cfg = _config(args)
    t = cfg.training
    hardware = resolve_hardware(cfg)  # the precision toolkit runs in here
    bf16 = hardware.precision.value == "bf16"
    path = resolve_model(cfg.model.source, cfg.model.revision).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_chat_template(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    system = cfg.data.system_prompt or None
    train = encode_split(tokenizer, cfg.data.train, load_split(cfg.data.train, "train"), system,
                         t.max_seq_len)
    held_out = encode_split(tokenizer, cfg.data.eval, load_split(cfg.data.eval, "eval"), system,
                            t.max_seq_len)
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
             "labels": e.labels} for e in train.examples]
    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False  # as in toolkit: no KV cache kept during training
    model = get_peft_model(model, LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=t.batch_size,
            gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate,
            max_steps=args.steps, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
            lr_scheduler_type="linear", optim="adamw_torch", seed=t.seed, data_seed=t.seed,
            use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
            disable_tqdm=True, include_num_input_tokens_seen="non_padding", bf16=bf16,
        )
        if padding == "max_length":
            rows = [_pad_row(row, tokenizer.pad_token_id, t.max_seq_len) for row in rows]
            collator: Any = default_data_collator
        else:
            collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        counting = _CountingCollator(collator)
        trainer = Trainer(model=model, args=training_args, train_dataset=rows,
                          data_collator=counting)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    tokens = int(trainer.state.num_input_tokens_seen)
    with hardware.autocast():
        after = evaluate_split(model, held_out.examples)
    return {
        "padding": padding, "precision": "bf16" if bf16 else "fp32", "padded_tokens": 1 - counting.real / max(counting.total, 1),
        "tokens_per_s": tokens / seconds, "train_tokens": tokens, "train_time_s": seconds,
        "steps": trainer.state.global_step, "eval_loss": after.loss,
        "threads": torch.get_num_threads(), "peak_rss_bytes": _peak_rss(),
    }


def _pad_row(row: dict[str, list[int]], pad_id: int, length: int) -> dict[str, list[int]]:
    extra = length - len(row["input_ids"])
    return {"input_ids": row["input_ids"] + [pad_id] * extra,
            "attention_mask": row["attention_mask"] + [0] * extra,
            "labels": row["labels"] + [-100] * extra}


class _CountingCollator:
    """Wraps the baseline's collator to measure how much of what it trains is padding."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.real = self.total = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        self.real += int(batch["attention_mask"].sum())
        self.total += int(batch["input_ids"].numel())
        return batch


def _child(name: str, args: argparse.Namespace, queue: Any) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["TOOLKIT_NO_PROGRESS"] = "1"
    if name == "toolkit":
        queue.put((name, run_toolkit(args)))
    else:
        queue.put((name, run_baseline(args, name.split(":", 1)[1])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs/model/smollm2-135m.yaml"))
    parser.add_argument("--data", default=str(REPO_ROOT / "data/train.jsonl"))
    parser.add_argument("--eval-data", default=str(REPO_ROOT / "data/test.jsonl"))
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per variant")
    parser.add_argument("--save", action="store_true",
                        help="write benchmarks/results/train_throughput.json and the README table")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per variant")
    parser.add_argument("--max-seq-len", type=int, default=None)
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                        help="override training.precision for every variant")
    parser.add_argument("--baselines", nargs="+", choices=["max_length", "longest"],
                        default=["max_length", "longest"], help="baseline paddings to run")
    args = parser.parse_args()

    context = mp.get_context("spawn")
    results: dict[str, dict[str, Any]] = {}
    # one at a time, in a fresh process each: they share the cores, and ru_maxrss is per process
    for name in [f"baseline:{p}" for p in args.baselines] + ["toolkit"]:
        queue = context.Queue()
        process = context.Process(target=_child, args=(name, args, queue))
        process.start()
        got, result = queue.get()
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"{name} variant failed (exit {process.exitcode})")
        results[got] = result

    ours = results["toolkit"]
    print(f"\ntrain throughput: {args.steps} optimizer steps per variant, {ours['threads']} torch "
          f"thread(s) each, {os.cpu_count()} CPUs; tokens = non-pad tokens trained")
    print(f"{'variant':<30} {'prec':>5} {'tokens/s':>9} {'tokens':>7} {'train s':>8} {'peak RSS':>10} "
          f"{'eval loss':>10}")
    for name, row in results.items():
        label = f"{name} ({row['padded_tokens']:.0%} pad)" if "padded_tokens" in row else name
        print(f"{label:<30} {row['precision']:>5} {row['tokens_per_s']:>9.1f} {row['train_tokens']:>7} "
              f"{row['train_time_s']:>8.1f} {row['peak_rss_bytes'] / 2**30:>6.2f} GiB "
              f"{row['eval_loss']:>10.4f}")
    print(f"held-out loss before training: {ours['eval_loss_before']:.4f}")
    summary: dict[str, Any] = {}
    for name, base in results.items():
        if name == "toolkit":
            continue
        speedup = ours["tokens_per_s"] / base["tokens_per_s"]
        rss = ours["peak_rss_bytes"] / base["peak_rss_bytes"]
        loss = ours["eval_loss"] - base["eval_loss"]
        verdict = ("meets" if speedup >= 1.5 and rss <= 1.0 and loss <= 1e-3 else "misses")
        print(f"toolkit / {name}: tokens/s {speedup:.2f}x (target >= 1.5x), peak RSS "
              f"{rss:.2f}x (target <= 1.00x), eval loss {loss:+.4f} -> {verdict} the target")
        summary[name] = {"speedup": speedup, "rss_ratio": rss, "eval_loss_delta": loss}
    print(json.dumps({"results": results, "ratios": summary}))
    if args.save:
        from results import save

        save("train_throughput", {"steps": args.steps, "threads": ours["threads"],
                                  "config": Path(args.config).name},
             [{"variant": name, **row} for name, row in results.items()])


if __name__ == "__main__":
    main()
