"""The optimisation loop: set up (or resume), then step, validate, checkpoint, until the planned steps are done or
validation stops improving; the best validated weights are the ones left in the model. What a step computes is
train/step.py; what happens once before the first step is train/setup.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sftops.config import TrainConfig
from sftops.data.batching import step_batches, step_micro_batches
from sftops.encoded import Encoded
from sftops.train import checkpoint
from sftops.train.distributed import SOLO, World
from sftops.train.setup import Training, set_up
from sftops.train.step import take_step

# Called on every process after each step is complete (validated, checkpointed): measurement, logs, fault points.
StepHook = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class LoopResult:
    steps: int  # taken, all runs of the job together
    planned_steps: int
    history: list[dict[str, float]]  # one record per step, from step 1 (a resumed run's too)
    validations: list[dict[str, Any]]  # {"step", "val_nll", "broken"} and each suite's figures (train/forgetting.py)
    best_step: int  # whose weights the model holds now
    stopped_early: bool
    resumed_from_step: int | None


def train_loop(
    model: torch.nn.Module,
    examples: Sequence[Encoded],
    cfg: TrainConfig,
    pad_id: int,
    world: World = SOLO,
    *,
    sources: Sequence[int] | None = None,
    source_names: Sequence[str] = (),
    checkpoints: Path | None = None,
    validate: Callable[[int], dict[str, Any]] | None = None,
    on_step: Sequence[StepHook] = (),
) -> LoopResult:
    """Train `model` in place. `sources` gives each example's index into `source_names` (for the per-source
    loss); `checkpoints` is the folder to checkpoint into and resume from; `validate(step)` returns the
    validation NLL (`val_nll`) and the suite budgets that step breaks (`broken`, empty when none)."""
    run = set_up(model, examples, cfg, world, checkpoints, sources, source_names)
    model.train()
    for step in progress(run):
        shares = step_batches(run.stream, cfg.grad_accum_steps, world.size, world.rank)
        batches = step_micro_batches(examples, shares, pad_id, cfg.packing, run.source_of)
        record = take_step(run, step, batches, rows=sum(map(len, shares)))
        run.state.history.append(record)
        stop = validate is not None and validation_says_stop(run, step, validate)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < run.steps and not stop:
            run.saver.save(f"{checkpoint.PREFIX}{step:06d}", dict(vars(run.state)))
        for hook in on_step:
            hook(step, record)
        if stop:
            break
    model.eval()
    if run.state.best_step and checkpoints is not None and run.state.best_step != run.state.step:
        run.saver.load_best()
    return result_of(run)


def progress(run: Training) -> tqdm:
    """The steps still to take, as a progress bar on the main process (a resumed run starts where it was)."""
    done = run.state.step
    return tqdm(
        range(done + 1, run.steps + 1),
        desc="train",
        unit="step",
        disable=not run.world.is_main,
        initial=done,
        total=run.steps,
    )


def validation_says_stop(run: Training, step: int, validate: Callable[[int], dict[str, Any]]) -> bool:
    """Every train.eval_every steps and at the last: the validation NLL and the suites' budgets; a new best (the
    lowest NLL among validations within every blocking suite's budget) is checkpointed as `best`, and
    train.early_stopping_patience validations without one stop the run."""
    cfg, state = run.cfg, run.state
    if not cfg.eval_every or (step % cfg.eval_every and step != run.steps):
        return False
    figures = validate(step)
    run.model.train()
    state.validations.append({"step": step, **figures})
    val = figures["val_nll"]
    if not figures.get("broken") and val < state.best_val:
        state.best_val, state.best_step, state.evals_without_improvement = val, step, 0
        run.saver.save(checkpoint.BEST, dict(vars(state)))
        return False
    state.evals_without_improvement += 1
    patience = cfg.early_stopping_patience
    return patience is not None and state.evals_without_improvement >= patience


def result_of(run: Training) -> LoopResult:
    state, resumed = run.state, run.resumed_from
    return LoopResult(
        steps=state.step,
        planned_steps=run.steps,
        history=state.history,
        validations=state.validations,
        best_step=state.best_step or state.step,
        stopped_early=state.step < run.steps,
        resumed_from_step=int(resumed.name.removeprefix(checkpoint.PREFIX)) if resumed is not None else None,
    )
