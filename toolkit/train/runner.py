"""`run_training`: config in, `runs/NAME/` out (adapter, checkpoints, manifest).

Order of work: everything a user can get wrong is checked first (data files, output
folder, hardware and precision, model source, LoRA targets against the architecture,
the chat template), each failing with one line; only then is the folder created and are
the weights loaded. Under torchrun/accelerate every process runs this function; process 0
writes the folder, prints, and moves the finished run into place.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from toolkit.artifacts import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    RunManifest,
    package_versions,
    sha256_file,
    utc_now,
    write_run,
)
from toolkit.config import Precision, TrainConfig, config_to_dict
from toolkit.errors import ConfigError, DataError
from toolkit.logs import route_logs
from toolkit.train import output as out
from toolkit.train.manifest import TRAIN_PACKAGES, read_manifest

if TYPE_CHECKING:
    from toolkit.model_source import ResolvedModel
    from toolkit.train.dataset import EncodedSplit
    from toolkit.train.model import Hardware

#: config fields a resumed run must share with the run it continues
#: third-party logging and warnings of the run (`toolkit.logs`), inside the run folder
LOG_FILE = "train.log"
RESUME_FIXED = (("model", None), ("lora", None), ("training", "quantization"))


@dataclass
class _Prepared:
    """Everything `run_training` checked and built before the weights are loaded."""

    cfg: TrainConfig
    plan: out.OutputPlan
    args: Any  # transformers.TrainingArguments (imported lazily)
    hardware: Hardware
    resolved: ResolvedModel
    tokenizer: Any
    chat_template_added: bool
    train_split: EncodedSplit
    eval_split: EncodedSplit | None
    started: float
    say: Callable[[str], None]
    console: Console
    #: set once trainer.train() began: a failure then keeps the checkpoints for --resume
    training_started: bool = False


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    manifest: dict[str, Any]

    @property
    def adapter_dir(self) -> Path:
        """The peft adapter folder (with the tokenizer)."""
        return self.run_dir / self.manifest["adapter_dir"]

    @property
    def before(self) -> dict[str, Any] | None:
        """Held-out perplexity before training (`Perplexity.to_dict()`)."""
        return self.manifest["metrics"]["before"]

    @property
    def after(self) -> dict[str, Any] | None:
        """Held-out perplexity after training."""
        return self.manifest["metrics"]["after"]


def _is_main_process() -> bool:
    """Rank 0 (or no launcher), known before torch.distributed is initialised."""
    return int(os.environ.get("RANK", "0")) == 0


def _check_resume_config(cfg: TrainConfig, previous: dict[str, Any] | None, where: Path) -> None:
    if previous is None:
        return
    current = config_to_dict(cfg)
    changed = []
    for section, key in RESUME_FIXED:
        old = previous.get(section, {}) if key is None else previous.get(section, {}).get(key)
        new = current[section] if key is None else current[section][key]
        if old != new:
            changed.append(section if key is None else f"{section}.{key}")
    if changed:
        raise ConfigError(
            f"--resume: {', '.join(changed)} differ from the run in {where}; resume with the "
            "same model and LoRA settings, or start a new run with --overwrite"
        )


def _peak_memory_bytes(cuda: bool) -> int:
    if cuda:
        import torch

        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def _reduce(value: int, op: str) -> int:
    """Sum or max an integer over the processes of a data-parallel run."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return int(tensor.item())


def micro_batch_rows(cfg: TrainConfig, cuda: bool) -> int:
    """Rows per forward pass: the configured batch on a GPU, one row on a CPU.

    The optimizer step is the same either way (batch_size x grad_accum rows, the loss
    normalised by all their answer tokens), so this changes only how the work is cut. A
    CPU gains no speed from batching rows, while one row at a time needs no padding and
    holds a batch_size-th of the activations: peak memory stays that of one row.
    """
    return cfg.training.batch_size if cuda else 1


def _training_arguments(cfg: TrainConfig, work: Path, cuda: bool, precision: str) -> Any:
    from transformers import TrainingArguments

    t = cfg.training
    micro = micro_batch_rows(cfg, cuda)
    return TrainingArguments(
        output_dir=str(work / CHECKPOINT_DIR),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=t.grad_accum * t.batch_size // micro,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        save_strategy="epoch",
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        seed=t.seed,
        data_seed=t.seed,
        fp16=cuda and precision == "fp16",
        bf16=precision == "bf16",  # on a CPU too: autocast over the bf16 base
        use_cpu=not cuda,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        dataloader_pin_memory=cuda,
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="no",
    )


def run_training(
    cfg: TrainConfig,
    output: Path,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    verbose: bool = False,
) -> TrainResult:
    """Fine-tune `cfg.model` with LoRA on `cfg.data.train` and write a run folder.

    Args:
        cfg: the validated training config.
        output: run folder to create (`runs/NAME`).
        resume: continue from the last checkpoint of `output` (or of its interrupted run).
        overwrite: replace an existing `output` once the new run is complete.
        console: where progress lines and the summary go (process 0 only).
        verbose: also show third-party logging and warnings on the console; they always go
            to the run's `train.log`.

    Raises:
        DataError: a data file is missing, empty, fails validation, or has no example left
            with an answer after truncation.
        ConfigError: unknown LoRA target, max_seq_len beyond the model, resume mismatch.
        ToolkitError: the output folder exists without --overwrite/--resume, or there is
            nothing to resume.
        UnsupportedHardwareError / MissingExtraError: QLoRA without CUDA or bitsandbytes.
    """
    with route_logs(verbose=verbose) as logs:
        started = time.perf_counter()
        main = _is_main_process()
        console = console or Console(stderr=True)

        def say(message: str) -> None:
            if main:
                console.print(message, highlight=False, soft_wrap=True)

        from toolkit.model_source import resolve_model
        from toolkit.train.dataset import load_split
        from toolkit.train.model import check_model_config, resolve_hardware

        # 1. Everything cheap, on every process, before anything is written.
        output = Path(output)
        plan = out.plan_output(output, resume, overwrite)
        train_examples = load_split(cfg.data.train, "train")
        eval_examples = load_split(cfg.data.eval, "eval") if cfg.data.eval else []
        progress_source = out.source_dir(plan)
        if plan.resuming:
            from toolkit.train.trainer import RunProgress

            _check_resume_config(cfg, RunProgress.load(progress_source).config, progress_source)
        hardware = resolve_hardware(cfg)
        if hardware.warning:
            say(f"[yellow]warning:[/yellow] {hardware.warning}")
        if cfg.training.threads:
            import torch

            torch.set_num_threads(cfg.training.threads)
        args = _training_arguments(cfg, plan.work, hardware.cuda, hardware.precision.value)
        with args.main_process_first(desc="resolve model"):
            resolved = resolve_model(cfg.model.source, cfg.model.revision)
        check_model_config(cfg, resolved.path)
        tokenizer, chat_template_added, train_split, eval_split = _encode(
            cfg, resolved.path, train_examples, eval_examples)
        say(_data_line(cfg, train_split, eval_split))
        if chat_template_added:
            say(f"{cfg.model.source}: no chat template; using toolkit's ChatML template "
                "(saved with the adapter)")

        # 2. The work folder, then the model.
        if main:
            out.prepare(plan)
            logs.attach(plan.work / LOG_FILE)  # moves with the folder into runs/NAME
        _barrier()
        prepared = _Prepared(cfg, plan, args, hardware, resolved, tokenizer, chat_template_added,
                             train_split, eval_split, started, say, console)
        try:
            return _train(prepared)
        except BaseException as exc:
            if main:
                if prepared.training_started and out.last_checkpoint(plan.work) is not None:
                    say(f"[yellow]stopped ({type(exc).__name__}):[/yellow] checkpoints kept in "
                        f"{plan.work}; continue with --resume")
                else:
                    out.discard(plan)
            raise


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _encode(cfg: TrainConfig, model_path: Path, train_examples: list[Any],
            eval_examples: list[Any]) -> tuple[Any, bool, Any, Any]:
    from transformers import AutoTokenizer

    from toolkit.data.prompts import ensure_chat_template
    from toolkit.train.dataset import encode_split

    tokenizer = AutoTokenizer.from_pretrained(
        model_path, trust_remote_code=cfg.model.trust_remote_code)
    added = ensure_chat_template(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    t = cfg.training
    system = cfg.data.system_prompt or None
    train_split = encode_split(tokenizer, cfg.data.train, train_examples, system, t.max_seq_len)
    if not train_split.examples:
        raise DataError(
            f"{cfg.data.train}: no example keeps an answer token within training.max_seq_len "
            f"{t.max_seq_len}; raise max_seq_len"
        )
    eval_split = (encode_split(tokenizer, cfg.data.eval, eval_examples, system, t.max_seq_len)
                  if cfg.data.eval else None)
    return tokenizer, added, train_split, eval_split


def _data_line(cfg: TrainConfig, train_split: Any, eval_split: Any) -> str:
    limit = cfg.training.max_seq_len

    def part(split: Any, role: str) -> str:
        text = (f"{role} {split.path}: {len(split.examples) + len(split.dropped)} examples, "
                f"{split.tokens:,} tokens, {split.truncated} truncated at {limit}")
        if split.dropped:
            text += f" ({len(split.dropped)} left with no answer, skipped: {', '.join(split.dropped[:5])})"
        return text

    lines = [part(train_split, "train")]
    lines.append(part(eval_split, "eval") if eval_split else "eval: none (data.eval is null)")
    return "data: " + "; ".join(lines)


def _train(p: _Prepared) -> TrainResult:
    import torch
    from transformers import set_seed

    from toolkit import __version__
    from toolkit.train.adapter import finish_adapter
    from toolkit.train.cpu_lora import tune_lora_for_cpu
    from toolkit.train.dataset import (
        RowCollator,
        RowDataset,
        pack_rows,
        padding_waste,
        unpacked_rows,
    )
    from toolkit.train.model import attach_lora, load_base, trainable_parameters
    from toolkit.train.report import print_summary
    from toolkit.train.trainer import (
        BarCallback,
        EvalCallback,
        RunProgress,
        TokenMeter,
        ToolkitTrainer,
        quiet_trainer_output,
    )

    cfg, plan, args, hardware, resolved = p.cfg, p.plan, p.args, p.hardware, p.resolved
    tokenizer, train_split, eval_split, say = p.tokenizer, p.train_split, p.eval_split, p.say
    main = args.process_index == 0
    world_size = args.world_size
    t = cfg.training
    set_seed(t.seed)
    model = attach_lora(load_base(cfg, resolved.path, hardware, args.local_process_index),
                        cfg.lora)
    if not hardware.cuda:
        tune_lora_for_cpu(model, under_autocast=hardware.precision is Precision.bf16)
    trainable, total = trainable_parameters(model)
    if t.packing:
        rows = pack_rows(train_split.examples, t.max_seq_len, t.seed)
        layout = f"{len(train_split.examples)} examples packed into {len(rows)} rows"
    else:
        rows = unpacked_rows(train_split.examples)
        waste = padding_waste(rows, args.per_device_train_batch_size)
        layout = f"one example per row, ~{waste:.0%} padding" + (
            " (packing: true removes it)" if waste > 0 else "")
    say(f"model: {resolved.source} -> LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} on "
        f"{', '.join(cfg.lora.target_modules)}: {trainable:,} trainable of {total:,} "
        f"parameters; {hardware.device} x{world_size}, {hardware.precision.value}"
        f"{', ' + str(torch.get_num_threads()) + ' threads' if not hardware.cuda else ''}; "
        f"{layout}")

    resumed_step = int(plan.checkpoint.name.split("-")[-1]) if plan.checkpoint else None
    progress = (RunProgress.load(plan.work, up_to_step=resumed_step) if plan.resuming
                else RunProgress())
    progress.config = config_to_dict(cfg)

    def persist(state: RunProgress) -> None:
        if main:
            state.save(plan.work)

    persist(progress)
    if resumed_step is not None:
        say(f"resuming from {plan.checkpoint} (step {resumed_step})")
    meter = TokenMeter()
    evaluator = EvalCallback(eval_split.examples if eval_split else [], progress, persist,
                             args.process_index, world_size, hardware.autocast,
                             count_tokens=lambda: _reduce(meter.tokens, "sum"))
    callbacks: list[Any] = [evaluator]
    if main:
        callbacks.append(BarCallback(meter, evaluator, world_size))
    trainer = ToolkitTrainer(
        model=model, args=args, train_dataset=RowDataset(rows),
        data_collator=RowCollator(tokenizer.pad_token_id, t.packing),
        processing_class=tokenizer, callbacks=callbacks, meter=meter,
    )
    quiet_trainer_output(trainer)
    p.training_started = True
    trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)
    if plan.mode == "copy" and trainer.state.global_step == resumed_step:
        return _keep_finished_run(plan, resumed_step, say, world_size)

    tokens, train_seconds = evaluator.run_totals()
    last = progress.epochs[-1] if progress.epochs else None
    if last is not None and last["step"] == trainer.state.global_step and (
            last["eval"] is not None or not evaluator.examples):
        after = last["eval"]
    else:
        after = evaluator.evaluate(trainer.model)
    peak = _reduce(_peak_memory_bytes(hardware.cuda), "max")
    trainer.save_model(str(plan.work / ADAPTER_DIR))  # every rank: collective under FSDP/ZeRO-3
    if main:  # a pickle of TrainingArguments: not part of an adapter
        (plan.work / ADAPTER_DIR / "training_args.bin").unlink(missing_ok=True)

    record = RunManifest(
        toolkit_version=__version__,
        created=utc_now(),
        config=config_to_dict(cfg),
        base_model={"source": resolved.source, "path": str(resolved.path),
                    "revision": resolved.revision, "kind": resolved.kind},
        adapter_dir=ADAPTER_DIR,
        checkpoint_dir=CHECKPOINT_DIR,
        chat_template_added=p.chat_template_added,
        data={"train": _data_entry(train_split),
              "eval": _data_entry(eval_split) if eval_split else None},
        versions={**package_versions(TRAIN_PACKAGES), "toolkit": __version__},
        device={"type": hardware.device, "name": hardware.device_name,
                "precision": hardware.precision.value,
                "requested_precision": hardware.requested.value,
                "quantization": t.quantization.value,
                "threads": None if hardware.cuda else torch.get_num_threads(),
                "world_size": world_size,
                "micro_batch_rows": args.per_device_train_batch_size,
                "accumulation_steps": args.gradient_accumulation_steps},
        world_size=world_size,
        packing=t.packing,
        metrics={"before": progress.before, "epochs": progress.epochs, "after": after},
        truncated_examples=train_split.truncated + (eval_split.truncated if eval_split else 0),
        steps=int(trainer.state.global_step),
        resumed_from_step=resumed_step,
        train_tokens=tokens,
        wall_time_s=0.0,
        train_time_s=round(train_seconds, 3),
        tokens_per_s=round(tokens / train_seconds, 2) if tokens else 0.0,
        peak_memory_bytes=peak,
        trainable_params=trainable,
        total_params=total,
    )
    if main:
        record.wall_time_s = round(time.perf_counter() - p.started, 2)
    manifest = record.model_dump(mode="json")
    if main:
        finish_adapter(plan.work / ADAPTER_DIR, resolved, manifest, plan.target.name)
        write_run(plan.work, record)
        out.finalize(plan)
        print_summary(p.console, manifest, str(plan.target))
    _end_processes(world_size)
    return TrainResult(plan.target, manifest)


def _keep_finished_run(plan: out.OutputPlan, step: int, say: Any, world_size: int) -> TrainResult:
    """`--resume` of a run that has nothing left to train: drop the copy, keep the run.

    Rewriting the manifest would replace its numbers with those of an invocation that
    trained nothing (0 tokens, 0 tok/s).
    """
    if _is_main_process():
        out.discard(plan)
        say(f"{plan.target}: already finished at step {step}; "
            "nothing to resume, the run is unchanged (raise training.epochs or max_steps to "
            "train further)")
    _end_processes(world_size)
    return TrainResult(plan.target, read_manifest(plan.target))


def _end_processes(world_size: int) -> None:
    """Wait for every process, then leave the process group of a multi-process run."""
    _barrier()
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _data_entry(split: Any) -> dict[str, Any]:
    return {
        "path": str(split.path),
        "sha256": sha256_file(split.path),
        "examples": len(split.examples) + len(split.dropped),
        "tokens": split.tokens,
        "truncated": split.truncated,
        "dropped": list(split.dropped),
    }
