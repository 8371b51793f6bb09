"""The optimisation loop: AdamW, warmup + cosine schedule, gradient accumulation weighted by target tokens,
gradient clipping, seeded data order."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from sftops.chat import Encoded
from sftops.config import TrainConfig
from sftops.errors import TrainingError
from sftops.objective import autocast, collate, n_targets, row_nll

StepCallback = Callable[[int, dict[str, float]], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def micro_batches(lengths: Sequence[int], size: int, seed: int, group_by_length: bool = False) -> Iterator[list[int]]:
    """Index lists, one per micro-batch, epoch after epoch; each epoch is a fresh seeded shuffle.

    With group_by_length, each window of 64 micro-batches is sorted by length before it is cut, and the
    micro-batches are shuffled again: rows of similar length share a batch, so little compute goes to padding.
    The objective is unchanged (every step is weighted by its target tokens)."""
    n, epoch = len(lengths), 0
    while True:
        g = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        if not group_by_length:
            yield from (perm[start : start + size] for start in range(0, n, size))
        else:
            window = size * 64
            chunks = []
            for w in range(0, n, window):
                part = sorted(perm[w : w + window], key=lambda i: lengths[i])
                chunks += [part[start : start + size] for start in range(0, len(part), size)]
            yield from (chunks[i] for i in torch.randperm(len(chunks), generator=g).tolist())
        epoch += 1


def total_steps(n_examples: int, cfg: TrainConfig) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = math.ceil(math.ceil(n_examples / cfg.micro_batch_size) / cfg.grad_accum_steps)
    return per_epoch * cfg.epochs


def accumulate_gradients(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], device: torch.device) -> tuple[float, int]:
    """Forward/backward over the micro-batches of one optimizer step; returns the step's loss and target count.

    Each micro-batch contributes its NLL sum divided by the target count of the whole step, so the accumulated
    gradient is that of the token-mean over the step, not a mean of per-micro-batch means."""
    step_tokens = sum(n_targets(b["labels"]) for b in batches)
    step_nll = 0.0
    for batch in batches:
        with autocast(device):
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
            ).logits
        nll = row_nll(logits, batch["labels"].to(device))[0].sum()
        (nll / max(step_tokens, 1)).backward()
        step_nll += nll.item()
    return step_nll / max(step_tokens, 1), step_tokens


def train_loop(
    model: torch.nn.Module,
    examples: Sequence[Encoded],
    cfg: TrainConfig,
    pad_id: int,
    device: torch.device,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    if not examples:
        raise TrainingError("no training examples left after encoding (all rows too long or without a response); see models/run.json")
    seed_everything(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=device.type == "cuda" or None
    )
    steps = total_steps(len(examples), cfg)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * steps), steps)
    stream = micro_batches([len(e.input_ids) for e in examples], cfg.micro_batch_size, cfg.seed, cfg.group_by_length)
    model.train()
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, steps + 1), desc="train", unit="step")
    for step in bar:
        batches = [collate([examples[i] for i in next(stream)], pad_id) for _ in range(cfg.grad_accum_steps)]
        loss, step_tokens = accumulate_gradients(model, batches, device)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TrainingError(f"step {step}: loss={loss} grad_norm={grad_norm}; lower train.learning_rate")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"train_loss": loss, "learning_rate": lr, "grad_norm": grad_norm, "target_tokens": float(step_tokens)}
        history.append(record)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if on_step is not None:
            on_step(step, record)
    model.eval()
    return {"steps": steps, "history": history}
