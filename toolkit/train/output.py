"""The run folder's life cycle: never half-written, replaced only when the new one is complete.

A run is built in `.NAME.partial/` next to `NAME/` and renamed into place at the end. With
`--overwrite` the old run stays until the new one is complete. A run interrupted during
training keeps its `.partial` folder (checkpoints and evaluation history), which `--resume`
continues; a run that fails before training starts leaves nothing behind.

    NAME/
      adapter/          peft adapter + tokenizer (with its chat template)
      checkpoints/      checkpoint-STEP/ (adapter, optimizer, scheduler, RNG): --resume
      progress.json     config and evaluation history so far
      manifest.json     see toolkit.artifacts.RunManifest
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from toolkit.artifacts import CHECKPOINT_DIR
from toolkit.atomic import clean_stale, commit
from toolkit.errors import ToolkitError


@dataclass(frozen=True)
class OutputPlan:
    """Where this invocation works and what it starts from."""

    target: Path
    work: Path
    #: "fresh" (new or --overwrite), "continue" (resume an interrupted .partial) or
    #: "copy" (resume a finished run: copied into .partial, the original kept until the end)
    mode: str
    checkpoint: Path | None = None

    @property
    def resuming(self) -> bool:
        """True when training continues from a checkpoint."""
        return self.checkpoint is not None


def partial_dir(target: Path) -> Path:
    """The hidden work folder of a run."""
    return target.parent / f".{target.name}.partial"


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest `checkpoints/checkpoint-STEP` folder of a run, if any."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = [p for p in folder.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[-1].isdigit()
             and (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def plan_output(target: Path, resume: bool, overwrite: bool) -> OutputPlan:
    """Decide how to build the run folder; reads only, so every process can call it.

    Raises:
        ToolkitError: the folder exists without --overwrite/--resume, both flags given, or
            nothing to resume.
    """
    if resume and overwrite:
        raise ToolkitError("--resume and --overwrite exclude each other: pick one")
    work = partial_dir(target)
    if target.exists() and not target.is_dir():
        raise ToolkitError(f"{target}: exists and is not a folder; choose another --output")
    if not resume:
        if target.exists() and not overwrite:
            raise ToolkitError(
                f"{target}: run folder exists; pass --overwrite to replace it or --resume to "
                "continue it"
            )
        return OutputPlan(target, work, "fresh")
    interrupted = last_checkpoint(work)
    if interrupted is not None:
        return OutputPlan(target, work, "continue", interrupted)
    finished = last_checkpoint(target) if target.is_dir() else None
    if finished is not None:
        return OutputPlan(target, work, "copy", work / CHECKPOINT_DIR / finished.name)
    raise ToolkitError(
        f"{target}: no checkpoint to resume from (neither {target}/{CHECKPOINT_DIR} nor an "
        "interrupted run); start it without --resume"
    )


def source_dir(plan: OutputPlan) -> Path:
    """The folder whose history a resumed run continues."""
    return plan.target if plan.mode == "copy" else plan.work


def prepare(plan: OutputPlan) -> None:
    """Create the work folder (main process only)."""
    clean_stale(plan.target.parent)  # a run killed between the two renames of `commit`
    if plan.mode in ("fresh", "copy") and plan.work.exists():
        shutil.rmtree(plan.work)  # a stale, superseded interrupted run
    if plan.mode == "copy":
        shutil.copytree(plan.target, plan.work)
    plan.work.mkdir(parents=True, exist_ok=True)


def discard(plan: OutputPlan) -> None:
    """Remove what this invocation created when it failed before training started."""
    if plan.mode in ("fresh", "copy"):
        shutil.rmtree(plan.work, ignore_errors=True)


def finalize(plan: OutputPlan) -> None:
    """Move the complete work folder into place, replacing an old run only now (with
    rollback: `atomic.commit`)."""
    commit(plan.work, plan.target)
