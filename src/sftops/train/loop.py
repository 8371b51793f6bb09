"""The optimisation loop: the exact SFT objective per step (across micro-batches and processes), AdamW,
warmup + cosine schedule, clipping, atomic checkpoints and resume, validation with early stopping."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from sftops import faults
from sftops.chat import Encoded, example_lengths
from sftops.config import TrainConfig
from sftops.data.batching import Batch, micro_batches, step_batches, step_micro_batches
from sftops.errors import GpuMemoryError, TrainingError
from sftops.train import checkpoint
from sftops.train.distributed import SOLO, World
from sftops.train.loss import SupervisedNLL, autocast, n_targets

StepCallback = Callable[[int, dict[str, float]], None]
MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids")


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
class StepStats:
    """Sums over every micro-batch of one optimizer step and every process."""

    response_nll_sum: float
    supervised_tokens: int
    correct_tokens: int
    source_nll_sums: list[float] = field(default_factory=list)
    source_tokens: list[float] = field(default_factory=list)
    rows: int = 0  # conversations trained on in this step, all processes

    @property
    def loss(self) -> float:
        return self.response_nll_sum / max(self.supervised_tokens, 1)


def accumulate_gradients(
    objective: torch.nn.Module,
    batches: Sequence[Batch],
    device: torch.device,
    world: World = SOLO,
    n_sources: int = 0,
    rows: int = 0,
) -> StepStats:
    """Forward/backward over this process's micro-batches of one optimizer step.

    The step's loss is sum(response-token NLL) / (supervised tokens of the whole step, all processes): each
    micro-batch backpropagates its NLL *sum* divided by that total, so neither the micro-batch size, the
    accumulation steps nor the number of processes changes the objective. DDP averages gradients over
    processes; multiplying by the world size turns that average back into the sum the objective needs.
    `rows` (this process's conversations) is summed with the rest, so the record shows each step's rows."""
    step_tokens = world.sum([sum(n_targets(b["labels"]) for b in batches)])[0]
    # Running sums stay on the device and are read once per step: a read per micro-batch would make the GPU wait.
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    source_sums = torch.zeros(n_sources, dtype=torch.float64, device=device)
    source_counts = torch.zeros(n_sources, dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        with gradient_sync(objective, last=i == len(batches) - 1):
            with autocast(device):
                token_nll, token_correct = objective(**{k: batch[k].to(device) for k in MODEL_INPUTS if k in batch})
            (token_nll.sum() * world.size / max(step_tokens, 1)).backward()
        token_nll = token_nll.detach().double()
        nll_sum += token_nll.sum()
        correct += token_correct.sum()
        if n_sources and "token_source" in batch:
            sources = batch["token_source"].to(device)
            source_sums.index_add_(0, sources, token_nll)
            source_counts.index_add_(0, sources, torch.ones_like(token_nll))
    nll_sum, correct = nll_sum.item(), int(correct)
    source_sums, source_counts = source_sums.cpu(), source_counts.cpu()
    totals = world.sum([nll_sum, correct, rows, *source_sums.tolist(), *source_counts.tolist()])
    return StepStats(
        response_nll_sum=totals[0],
        supervised_tokens=int(step_tokens),
        correct_tokens=int(totals[1]),
        rows=int(totals[2]),
        source_nll_sums=totals[3 : 3 + n_sources],
        source_tokens=totals[3 + n_sources :],
    )


@contextlib.contextmanager
def gradient_sync(objective: torch.nn.Module, last: bool) -> Iterator[None]:
    """Reduce gradients across processes only on the step's last micro-batch (DDP's no_sync, FSDP's
    set_requires_gradient_sync); a single process has nothing to reduce."""
    inner = getattr(objective, "module", objective)
    sharded = getattr(getattr(inner, "model", None), "set_requires_gradient_sync", None)
    if sharded is not None:
        sharded(last)
        yield
    elif hasattr(objective, "no_sync") and not last:
        with objective.no_sync():
            yield
    else:
        yield


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
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
    sharded = (
        world.size > 1 and cfg.distributed == "fsdp"
    )  # the model itself was sharded before the optimizer was built
    objective: torch.nn.Module = SupervisedNLL(model, full_forward=sharded)
    if world.size > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        objective = DistributedDataParallel(objective, device_ids=ids)
    if cfg.compile:
        objective = torch.compile(objective, dynamic=True)
    return objective


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


def out_of_memory_advice(cfg: TrainConfig, step: int, last: Path | None) -> str:
    """What to change when a step does not fit in GPU memory, cheapest first; the objective stays the same."""
    tips = []
    if cfg.micro_batch_size > 1:
        half = cfg.micro_batch_size // 2
        tips.append(
            f"train.micro_batch_size={half} with "
            f"train.grad_accum_steps={cfg.grad_accum_steps * cfg.micro_batch_size // half} "
            "(the same effective batch and loss)"
        )
    if not cfg.gradient_checkpointing:
        tips.append("train.gradient_checkpointing=true")
    tips.append("a smaller model.max_length (longer rows are dropped or truncated, see data.overflow)")
    if cfg.method == "full":
        tips.append("train.method=lora")
    kept = f"; the last good checkpoint is {last}, and a re-run with the same settings resumes from it" if last else ""
    return f"step {step}: out of GPU memory. Try " + ", or ".join(tips) + kept


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
    validate: Callable[[], float] | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Train `model` in place. `sources` gives each example's index into `source_names` (for the per-source
    loss); `checkpoints` is the folder to checkpoint into and resume from; `validate` returns the validation NLL."""
    if not examples:
        raise TrainingError(
            "no training examples left after encoding (all rows too long or without a response); see models/run.json"
        )
    device = world.device
    seed_everything(cfg.seed)
    sharded = world.size > 1 and cfg.distributed == "fsdp"
    state, saved = LoopState(), None
    resumed = checkpoint.latest(checkpoints) if checkpoints else None
    if resumed is not None and not checkpoint.is_sharded(resumed):
        saved = checkpoint.load(resumed, model)
    if sharded:
        shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg, device)
    steps = total_steps(len(examples), cfg, world.size)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * steps), steps)
    if resumed is not None:
        if checkpoint.is_sharded(resumed):  # each process reads its shards, whatever the number that wrote them
            saved = checkpoint.load_sharded(resumed, model, optimizer)
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        checkpoint.set_rng_state(saved["rng"])
        state = LoopState(**saved["loop"])
        same_batches_per_step(state, cfg, world, resumed)
        if on_step is not None and world.is_main:  # the resumed run's record starts at step 1, too
            for number, record in enumerate(state.history, start=1):
                on_step(number, record)
    state.micro_batch_size, state.micro_batches_per_step = cfg.micro_batch_size, cfg.grad_accum_steps * world.size
    objective = wrap_objective(model, cfg, world)  # after resuming: DDP starts every process from rank 0's weights
    # lengths from the offsets of array-backed examples; a micro-batch's rows are sliced out only when it runs
    stream = micro_batches(example_lengths(examples), cfg.micro_batch_size, cfg.seed, cfg.group_by_length)
    for _ in range(state.step * cfg.grad_accum_steps * world.size):  # the data position: skip what was trained on
        next(stream)
    source_of = np.asarray(sources, dtype=np.int64) if sources is not None else np.zeros(len(examples), dtype=np.int64)
    n_sources = len(source_names) if len(source_names) > 1 else 0

    def save(name: str) -> Path | None:
        if checkpoints is None:
            return None
        if cfg.distributed == "fsdp":  # every process writes its own shards: nothing is gathered
            if world.is_main:
                checkpoint.start(checkpoints, name)
            world.barrier()
            checkpoint.write_shards(checkpoint.temporary(checkpoints, name), model, optimizer)
            faults.point(f"checkpoint_write:{name}")
            world.barrier()
        path = None
        if world.is_main:
            saved = {"scheduler": scheduler.state_dict(), "rng": checkpoint.rng_state(), "loop": dict(vars(state))}
            if cfg.distributed == "fsdp":
                path = checkpoint.commit(checkpoints, name, saved)
            else:
                saved["optimizer"] = optimizer.state_dict()
                path = checkpoint.save(checkpoints, name, checkpoint.trainable_state(model), saved)
            if name.startswith(checkpoint.PREFIX):
                checkpoint.prune(checkpoints, cfg.keep_checkpoints)
        world.barrier()
        return path

    model.train()
    bar = tqdm(
        range(state.step + 1, steps + 1),
        desc="train",
        unit="step",
        disable=not world.is_main,
        initial=state.step,
        total=steps,
    )
    for step in bar:
        started = time.perf_counter()
        shares = step_batches(stream, cfg.grad_accum_steps, world.size, world.rank)
        batches = step_micro_batches(examples, shares, pad_id, cfg.packing, source_of)
        try:
            faults.out_of_memory(f"step:{step}")
            stats = accumulate_gradients(objective, batches, device, world, n_sources, rows=sum(map(len, shares)))
        except torch.OutOfMemoryError:
            raise GpuMemoryError(
                out_of_memory_advice(cfg, step, checkpoint.latest(checkpoints) if checkpoints else None)
            ) from None
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a sharded norm
        if not (math.isfinite(stats.loss) and math.isfinite(grad_norm)):
            last = checkpoint.latest(checkpoints) if checkpoints else None
            kept = (
                f"the last good checkpoint is {last}"
                if last
                else "no checkpoint was written yet (set train.checkpoint_every)"
            )
            raise TrainingError(
                f"step {step}: non-finite loss ({stats.loss}) or gradient norm ({grad_norm}); the update was not "
                f"applied and {kept}; lower train.learning_rate or check the data of this step"
            )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        state.step = step
        state.cumulative_tokens += stats.supervised_tokens
        record = {
            "train_loss": stats.loss,
            "response_nll_sum": stats.response_nll_sum,
            "supervised_tokens": float(stats.supervised_tokens),
            "rows": float(stats.rows),
            "token_accuracy": stats.correct_tokens / max(stats.supervised_tokens, 1),
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "supervised_tokens_per_s": stats.supervised_tokens / seconds,
            "cumulative_supervised_tokens": float(state.cumulative_tokens),
        }
        for name, total, count in zip(source_names, stats.source_nll_sums, stats.source_tokens):
            if count:
                record[f"train_loss/{name}"] = total / count
        state.history.append(record)
        bar.set_postfix(loss=f"{stats.loss:.3f}", lr=f"{lr:.2e}")
        if on_step is not None and world.is_main:
            on_step(step, record)
        stop = False
        if validate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == steps):
            val = validate()
            model.train()
            state.validations.append({"step": step, "val_nll": val})
            if val < state.best_val:
                state.best_val, state.best_step, state.evals_without_improvement = val, step, 0
                save("best")
            else:
                state.evals_without_improvement += 1
                patience = cfg.early_stopping_patience
                stop = patience is not None and state.evals_without_improvement >= patience
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps and not stop:
            save(f"{checkpoint.PREFIX}{step:06d}")
        faults.point(f"after_step:{step}")
        faults.pause(f"after_step:{step}")
        if stop:
            break
    model.eval()
    if state.best_step and checkpoints is not None and state.best_step != state.step:
        best = checkpoints / "best"  # export the best validated weights, not the last
        checkpoint.load_sharded(best, model) if checkpoint.is_sharded(best) else checkpoint.load(best, model)
    return {
        "steps": state.step,
        "planned_steps": steps,
        "history": state.history,
        "validations": state.validations,
        "best_step": state.best_step or state.step,
        "stopped_early": state.step < steps,
        "resumed_from_step": int(resumed.name.removeprefix(checkpoint.PREFIX)) if resumed is not None else None,
    }
