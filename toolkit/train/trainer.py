"""transformers' `Trainer` with toolkit's loss, throughput meter, evaluation and progress bar.

Building on `Trainer` gives data parallelism, DeepSpeed/FSDP (through accelerate config
files), fp16 grad scaling and checkpoint/resume; what it lacks is added here:

- the loss is computed on the answer tokens only and the vocabulary projection runs only
  on those positions (`logits_to_keep` as a boolean mask): prompt tokens never build the
  (tokens x vocab) logits, the largest tensor of a small model's step;
- non-pad tokens are counted for tokens/s;
- held-out loss/perplexity before training and after each epoch, kept in `RunProgress`
  (persisted beside the checkpoints so `--resume` keeps the history);
- one tqdm bar with loss and tokens/s on rank 0, instead of Trainer's log dicts.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from toolkit.data.prompts import IGNORE_INDEX, EncodedExample
from toolkit.train.evaluate import evaluate_split

PROGRESS_FILE = "progress.json"


@dataclass
class RunProgress:
    """A run's config and evaluation history: before training, then one record per epoch."""

    config: dict[str, Any] | None = None
    before: dict[str, Any] | None = None
    epochs: list[dict[str, Any]] = field(default_factory=list)

    def save(self, folder: Path) -> None:
        """Write atomically into the run folder."""
        tmp = folder / f".{PROGRESS_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        tmp.replace(folder / PROGRESS_FILE)

    @classmethod
    def load(cls, folder: Path, up_to_step: int | None = None) -> RunProgress:
        """Read the history, dropping epochs newer than the checkpoint resumed from."""
        path = folder / PROGRESS_FILE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text(encoding="utf-8"))
        epochs = [e for e in data.get("epochs", [])
                  if up_to_step is None or e.get("step", 0) <= up_to_step]
        return cls(config=data.get("config"), before=data.get("before"), epochs=epochs)


class TokenMeter:
    """Non-pad tokens trained by this process (kept on device; read at log time)."""

    def __init__(self) -> None:
        self._count: Any = 0

    def add(self, tokens: Any) -> None:
        """Add a 0-d tensor (or int) of tokens."""
        self._count = self._count + tokens

    @property
    def tokens(self) -> int:
        """Tokens so far."""
        return int(self._count)


class ToolkitTrainer(Trainer):
    """`Trainer` whose loss covers answer tokens only, computed without prompt logits."""

    def __init__(self, *args: Any, meter: TokenMeter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meter = meter
        # Our loss is normalised by the answer tokens of the whole accumulated (and, with
        # several processes, gathered) batch, which Trainer counts only for models it
        # believes take loss kwargs.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        base = self.accelerator.unwrap_model(self.model)
        forward = getattr(getattr(base, "get_base_model", lambda: base)(), "forward", None)
        self._mask_logits = forward is not None and "logits_to_keep" in inspect.signature(
            forward).parameters

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        import torch
        import torch.nn.functional as F

        inputs = dict(inputs)
        num_tokens = inputs.pop("num_tokens", None)
        labels = inputs.pop("labels")
        if num_tokens is not None and model.training:
            self.meter.add(num_tokens)
        targets_mask = labels[:, 1:] != IGNORE_INDEX
        targets = labels[:, 1:][targets_mask]
        if self._mask_logits:
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = targets_mask
            inputs["logits_to_keep"] = keep
        outputs = model(**inputs)
        logits = outputs.logits
        if logits.dim() == 3:  # the model ignored the mask: select answer positions here
            logits = logits[:, :-1][targets_mask]
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        if num_items_in_batch is None:
            num_items_in_batch = max(int(targets.numel()), 1) * self.current_gradient_accumulation_steps
        loss = loss / num_items_in_batch
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            # num_items_in_batch counts every process's tokens and DDP averages gradients.
            loss = loss * self.args.world_size
        return (loss, outputs) if return_outputs else loss


class EvalCallback(TrainerCallback):
    """Held-out evaluation before training and at each epoch end; times train vs eval.

    Evaluation runs inside `autocast` (training's autocast region), so the model computes
    as it trains whether or not accelerate has wrapped its forward. Each epoch record also
    carries the tokens and training seconds of the whole run so far: a resumed run starts
    from those of the checkpoint it continues (the epoch record at that step), so its
    manifest reports the whole run, with the work lost after that checkpoint counted once.

    Args:
        count_tokens: tokens trained by this invocation, all processes (a collective call).
    """

    def __init__(self, examples: Sequence[EncodedExample], progress: RunProgress,
                 persist: Callable[[RunProgress], None], rank: int, world_size: int,
                 autocast: Callable[[], AbstractContextManager[Any]],
                 count_tokens: Callable[[], int]) -> None:
        self.examples = examples
        self.count_tokens = count_tokens
        resumed = progress.epochs[-1] if progress.epochs else {}
        self.prior_tokens = int(resumed.get("train_tokens", 0))
        self.prior_seconds = float(resumed.get("train_time_s", 0.0))
        self.autocast = autocast
        self.progress = progress
        self.persist = persist
        self.rank = rank
        self.world_size = world_size
        self.losses: list[float] = []
        self.eval_seconds = 0.0
        self.train_started: float | None = None
        self.train_ended: float | None = None

    def evaluate(self, model: Any) -> dict[str, Any] | None:
        """Evaluate now (every rank), or None without held-out data."""
        if not self.examples:
            return None
        start = time.perf_counter()
        with self.autocast():
            result = evaluate_split(model, self.examples, self.rank, self.world_size).to_dict()
        self.eval_seconds += time.perf_counter() - start
        return result

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress.before is None and self.examples:
            self.progress.before = self.evaluate(kwargs["model"])
            self.persist(self.progress)
        self.eval_seconds = 0.0
        self.train_started = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tokens, seconds = self.run_totals()
        record = {
            "epoch": round(float(state.epoch or 0.0), 3),
            "step": int(state.global_step),
            "train_loss": sum(self.losses) / len(self.losses) if self.losses else None,
            "eval": self.evaluate(kwargs["model"]),
            "train_tokens": tokens,
            "train_time_s": round(seconds, 3),
        }
        self.losses = []
        self.progress.epochs = [e for e in self.progress.epochs if e["step"] != record["step"]]
        self.progress.epochs.append(record)
        self.persist(self.progress)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.train_ended = time.perf_counter()

    @property
    def train_seconds(self) -> float:
        """Wall time of the training loop, held-out evaluations excluded."""
        if self.train_started is None:
            return 0.0
        end = self.train_ended or time.perf_counter()
        return max(end - self.train_started - self.eval_seconds, 1e-9)

    def run_totals(self) -> tuple[int, float]:
        """Tokens and training seconds of the whole run: the resumed checkpoint's, plus ours."""
        return self.prior_tokens + self.count_tokens(), self.prior_seconds + self.train_seconds


class BarCallback(TrainerCallback):
    """One progress bar (rank 0): optimizer steps, last loss, tokens/s of all processes."""

    def __init__(self, meter: TokenMeter, clock: EvalCallback, world_size: int) -> None:
        self.meter = meter
        self.clock = clock
        self.world_size = world_size
        self.bar: Any = None
        self.loss: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train",
                        unit="step", dynamic_ncols=True,
                        disable=os.environ.get("TOOLKIT_NO_PROGRESS") == "1")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
            self._postfix()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is None:
            return
        rate = self.meter.tokens * self.world_size / self.clock.train_seconds
        loss = f"{self.loss:.3f}" if self.loss is not None else "-"
        self.bar.set_postfix_str(f"loss {loss}, {rate:,.0f} tok/s")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def quiet_trainer_output(trainer: Trainer) -> None:
    """Drop Trainer's own progress bar and log printer (ours replace them)."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
