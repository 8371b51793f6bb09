"""A training run set up before its first step, or resumed from its newest checkpoint: the model sharded (FSDP)
or wrapped (DDP), the optimizer and schedule, the loop state and the data position. Everything here happens once;
the loop (train/loop.py) only steps."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from sftops.config import TrainConfig
from sftops.data.batching import micro_batches
from sftops.encoded import Encoded, example_lengths
from sftops.errors import TrainingError
from sftops.train import checkpoint
from sftops.train.distributed import World
from sftops.train.loss import SupervisedNLL


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def total_steps(n_examples: int, cfg: TrainConfig, world_size: int = 1) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    micro_per_epoch = math.ceil(n_examples / cfg.micro_batch_size)
    return math.ceil(micro_per_epoch / (cfg.grad_accum_steps * world_size)) * cfg.epochs


@dataclass
class LoopState:
    """Everything besides weights, optimizer and scheduler that a resumed run needs to continue exactly."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    validations: list[dict[str, float]] = field(default_factory=list)
    best_val: float = math.inf
    best_step: int = 0
    evals_without_improvement: int = 0
    cumulative_tokens: int = 0
    # The step's geometry: a resumed run must take the same micro-batches per step (0: not recorded).
    micro_batch_size: int = 0
    micro_batches_per_step: int = 0


@dataclass
class Training:
    """One run's moving parts, as the loop and the step use them."""

    cfg: TrainConfig
    world: World
    model: torch.nn.Module
    objective: torch.nn.Module  # the model's SFT loss, wrapped for DDP or compiled as configured
    params: list[torch.nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: LoopState
    saver: checkpoint.Saver
    steps: int  # planned
    stream: Iterator[list[int]]  # micro-batches of example indices, positioned after what was trained on
    source_of: np.ndarray  # each example's source index
    source_names: Sequence[str]
    resumed_from: Path | None

    @property
    def n_sources(self) -> int:
        return len(self.source_names) if len(self.source_names) > 1 else 0


def set_up(
    model: torch.nn.Module,
    examples: Sequence[Encoded],
    cfg: TrainConfig,
    world: World,
    checkpoints: Path | None,
    sources: Sequence[int] | None,
    source_names: Sequence[str],
) -> Training:
    """Start the run, or resume it exactly (weights, optimizer, schedule, RNG, data position) from the newest
    valid checkpoint in `checkpoints`."""
    if not examples:
        raise TrainingError(
            "no training examples left after encoding (all rows too long or without a response); see models/run.json"
        )
    seed_everything(cfg.seed)
    resumed = checkpoint.latest(checkpoints) if checkpoints else None
    saved = checkpoint.load(resumed, model) if resumed is not None and not checkpoint.is_sharded(resumed) else None
    if world.size > 1 and cfg.distributed == "fsdp":
        shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    steps = total_steps(len(examples), cfg, world.size)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * steps), steps)
    state = LoopState()
    if resumed is not None:
        state = resume(resumed, saved, model, optimizer, scheduler)
        same_batches_per_step(state, cfg, world, resumed)
    state.micro_batch_size, state.micro_batches_per_step = cfg.micro_batch_size, cfg.grad_accum_steps * world.size
    # lengths from the offsets of array-backed examples; a micro-batch's rows are sliced out only when it runs
    stream = micro_batches(example_lengths(examples), cfg.micro_batch_size, cfg.seed, cfg.group_by_length)
    for _ in range(state.step * cfg.grad_accum_steps * world.size):  # the data position: skip what was trained on
        next(stream)
    return Training(
        cfg=cfg,
        world=world,
        model=model,
        objective=wrap_objective(model, cfg, world),  # after resuming: DDP starts every process from rank 0's weights
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        saver=checkpoint.Saver(
            checkpoints, model, optimizer, scheduler, world, cfg.distributed == "fsdp", cfg.keep_checkpoints
        ),
        steps=steps,
        stream=stream,
        source_of=np.asarray(sources if sources is not None else np.zeros(len(examples)), dtype=np.int64),
        source_names=source_names,
        resumed_from=resumed,
    )


def resume(path: Path, saved: dict[str, Any] | None, model, optimizer, scheduler) -> LoopState:
    """Optimizer, schedule, RNG and loop state from checkpoint `path` (the weights of an unsharded one are already
    in the model: `saved` is what loading them returned)."""
    if checkpoint.is_sharded(path):  # each process reads its shards, whatever the number that wrote them
        saved = checkpoint.load_sharded(path, model, optimizer)
    else:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    checkpoint.set_rng_state(saved["rng"])
    return LoopState(**saved["loop"])


def same_batches_per_step(state: LoopState, cfg: TrainConfig, world: World, resumed: Path) -> None:
    """Any number of processes may resume a job, as long as each step still trains the same rows: the data
    position and the objective carry over only then."""
    now = (cfg.micro_batch_size, cfg.grad_accum_steps * world.size)
    if state.micro_batches_per_step and (state.micro_batch_size, state.micro_batches_per_step) != now:
        raise TrainingError(
            f"checkpoint {resumed} was written taking {state.micro_batches_per_step} micro-batches of "
            f"{state.micro_batch_size} rows per step, this run takes {now[1]} of {now[0]} "
            f"(train.grad_accum_steps {cfg.grad_accum_steps} x {world.size} processes): set train.micro_batch_size="
            f"{state.micro_batch_size} and train.grad_accum_steps so that grad_accum_steps x processes = "
            f"{state.micro_batches_per_step}"
        )


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    # The fused kernel does the whole update in one pass over the parameters where torch has one for the device.
    if cfg.distributed == "fsdp" and any(hasattr(p, "full_tensor") for p in params):
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def shard(model: torch.nn.Module) -> None:
    """FSDP2: shard each transformer block, then the rest, across the processes (in place)."""
    from torch.distributed.fsdp import fully_shard

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_names = set(getattr(causal_lm, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise TrainingError(
            f"distributed=fsdp: no transformer blocks ({block_names or 'unknown'}) found in {type(causal_lm).__name__}"
        )
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def wrap_objective(model: torch.nn.Module, cfg: TrainConfig, world: World) -> torch.nn.Module:
    sharded = world.size > 1 and cfg.distributed == "fsdp"  # the model itself was sharded before the optimizer
    objective: torch.nn.Module = SupervisedNLL(model, full_forward=sharded)
    if world.size > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        objective = DistributedDataParallel(objective, device_ids=ids)
    if cfg.compile:
        objective = torch.compile(objective, dynamic=True)
    return objective
