"""A few optimizer steps measured for real: the configured model and method on synthetic rows of max_length
tokens, every one a target (the most a micro-batch can hold), through the training loop production runs. What
`sftops plan --measure-steps N` adds to the estimate: time per step and the measured peak memory."""

from __future__ import annotations

from statistics import mean
from typing import Any

import torch

from sftops import accelerator, machine
from sftops.config import Config
from sftops.encoded import Encoded
from sftops.modeling import load_base_model
from sftops.plan.fit import row_tokens
from sftops.train.distributed import World
from sftops.train.loop import train_loop
from sftops.train.lora import apply_method
from sftops.train.setup import seed_everything


def synthetic_rows(n: int, length: int, vocab: int, seed: int = 0) -> list[Encoded]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=generator).tolist()
    return [Encoded(row, list(row)) for row in ids]


def measure_steps(cfg: Config, steps: int) -> dict[str, Any]:
    """`steps` optimizer steps after one warm-up step: their mean time, and the peak memory of the whole run (on
    a GPU, allocated by torch; on CPU, the process's peak resident memory above what it held before the model)."""
    device = machine.device()
    before = accelerator.rss_bytes()
    seed_everything(cfg.train.seed)
    model = apply_method(load_base_model(cfg.model, quantize_4bit=cfg.train.method == "qlora"), cfg.train)
    if cfg.train.method != "qlora":
        model = model.to(device)
    reset = accelerator.reset_peak_memory(device)  # loading's own peak is the estimate's `loading`, not measured here
    train = cfg.train.model_copy(
        update={"max_steps": steps + 1, "checkpoint_every": None, "eval_every": None, "early_stopping_patience": None}
    )
    rows = synthetic_rows(
        (steps + 1) * train.micro_batch_size * train.grad_accum_steps,
        row_tokens(cfg),
        model.config.vocab_size if hasattr(model, "config") else 2,
    )
    seconds: list[float] = []
    train_loop(
        model,
        rows,
        train,
        pad_id=0,
        world=World(device=device),
        on_step=[lambda _, r: seconds.append(r["step_seconds"])],
    )
    peak = accelerator.peak_memory(device)
    return {
        "steps": steps,
        "warmup_step_s": seconds[0],
        "step_s": mean(seconds[1:]) if len(seconds) > 1 else seconds[0],
        "peak_bytes": peak["allocated"] if device.type == "cuda" else peak["rss"] - before,
        "peak_counts": "torch's allocated peak"
        if device.type == "cuda"
        else (
            "resident memory above the process before loading"
            + ("" if reset else " (peak not reset: loading included)")
        ),
        "device": accelerator.device_name(device),
    }
