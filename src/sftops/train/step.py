"""One optimizer step: the exact SFT objective over every micro-batch of the step and every process, clipping,
the update, and the step's record (what tracking logs and run.json keeps)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sftops import faults
from sftops.data.batching import Batch
from sftops.errors import GpuMemoryError, TrainingError
from sftops.train.distributed import SOLO, World
from sftops.train.loss import autocast, n_targets

if TYPE_CHECKING:
    from sftops.train.setup import Training

MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids")


@dataclass
class StepStats:
    """Sums over every micro-batch of one optimizer step and every process."""

    response_nll_sum: float
    supervised_tokens: int
    correct_tokens: int
    source_nll_sums: list[float] = field(default_factory=list)
    source_tokens: list[float] = field(default_factory=list)
    rows: int = 0  # conversations trained on in this step, all processes
    tokens: int = 0  # non-padding input tokens of the step, all processes (what throughput and MFU count)

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
    tokens = sum(input_tokens(b) for b in batches)
    totals = world.sum([nll_sum, correct, rows, tokens, *source_sums.tolist(), *source_counts.tolist()])
    return StepStats(
        response_nll_sum=totals[0],
        supervised_tokens=int(step_tokens),
        correct_tokens=int(totals[1]),
        rows=int(totals[2]),
        tokens=int(totals[3]),
        source_nll_sums=totals[4 : 4 + n_sources],
        source_tokens=totals[4 + n_sources :],
    )


def input_tokens(batch: Batch) -> int:
    """The batch's non-padding tokens: its attention mask's ones, or every token of a packed (padding-free) row."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


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


def take_step(run: Training, step: int, batches: Sequence[Batch], rows: int) -> dict[str, float]:
    """Gradients over the step's micro-batches, clipped, applied; returns the step's record. A step that runs
    out of GPU memory or gives a non-finite loss or gradient stops the run with the fix, before any update."""
    started = time.perf_counter()
    try:
        faults.out_of_memory(f"step:{step}")
        stats = accumulate_gradients(run.objective, batches, run.world.device, run.world, run.n_sources, rows)
    except torch.OutOfMemoryError:
        raise GpuMemoryError(out_of_memory_advice(run, step)) from None
    norm = torch.nn.utils.clip_grad_norm_(run.params, run.cfg.max_grad_norm)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a sharded norm
    if not (math.isfinite(stats.loss) and math.isfinite(grad_norm)):
        last = run.saver.latest()
        kept = (
            f"the last good checkpoint is {last}"
            if last
            else "no checkpoint was written yet (set train.checkpoint_every)"
        )
        raise TrainingError(
            f"step {step}: non-finite loss ({stats.loss}) or gradient norm ({grad_norm}); the update was not "
            f"applied and {kept}; lower train.learning_rate or check the data of this step"
        )
    learning_rate = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step = step
    run.state.cumulative_tokens += stats.supervised_tokens
    return step_record(stats, learning_rate, grad_norm, time.perf_counter() - started, run)


def step_record(stats: StepStats, learning_rate: float, grad_norm: float, seconds: float, run: Training) -> dict:
    """What one step logs: the objective's sum and count (so the normalisation can be audited), throughput, and
    the loss per source when there are several."""
    record = {
        "train_loss": stats.loss,
        "response_nll_sum": stats.response_nll_sum,
        "supervised_tokens": float(stats.supervised_tokens),
        "rows": float(stats.rows),
        "token_accuracy": stats.correct_tokens / max(stats.supervised_tokens, 1),
        "learning_rate": learning_rate,
        "grad_norm": grad_norm,
        "supervised_tokens_per_s": stats.supervised_tokens / seconds,
        "tokens": float(stats.tokens),
        "step_seconds": seconds,
        "cumulative_supervised_tokens": float(run.state.cumulative_tokens),
    }
    for name, total, count in zip(run.source_names, stats.source_nll_sums, stats.source_tokens):
        if count:
            record[f"train_loss/{name}"] = total / count
    return record


def out_of_memory_advice(run: Training, step: int) -> str:
    """What to change when a step does not fit in GPU memory, cheapest first; the objective stays the same."""
    cfg, tips = run.cfg, []
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
    last = run.saver.latest()
    kept = f"; the last good checkpoint is {last}, and a re-run with the same settings resumes from it" if last else ""
    return f"step {step}: out of GPU memory. Try " + ", or ".join(tips) + kept
