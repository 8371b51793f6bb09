"""Whether the configured run fits the device, decided before anything loads: the estimate (plan/memory.py)
against the memory free on the GPU, or on CPU the RAM available (which every process of the run shares). When it
does not fit, the train stage stops in one line with the estimate and settings that would fit, cheapest first."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sftops import accelerator, machine
from sftops.config import Config, TrainConfig
from sftops.errors import ModelError, TrainingError
from sftops.jsonio import read_json
from sftops.layout import STATS
from sftops.plan.memory import MemoryEstimate, estimate_memory
from sftops.plan.model_shape import ModelShape, model_shape

CUDA_CONTEXT = 512 * 1024**2  # the CUDA context and cuBLAS workspace, outside torch's allocator


@dataclass(frozen=True)
class Fit:
    estimate: MemoryEstimate
    needed: int  # bytes on the device: the peak, times the processes sharing it, plus what the runtime takes
    usable: int  # cost.usable_memory of what is free
    device: str

    @property
    def fits(self) -> bool:
        return self.needed <= self.usable


def gib(n: float) -> str:
    return f"{n / accelerator.GIB:.1f} GiB"


def row_tokens(cfg: Config) -> int:
    """The longest a row can be: model.max_length, or the longest curated row when the format stage has run
    (length grouping pads a micro-batch only to its longest row, so the largest micro-batch holds
    micro_batch_size rows of this length)."""
    stats = Path(cfg.paths.curated) / STATS
    if not stats.is_file():
        return cfg.model.max_length
    longest = read_json(stats).get("token_lengths", {}).get("total", {}).get("max")
    return min(cfg.model.max_length, int(longest)) if longest else cfg.model.max_length


def fit_of(cfg: Config, shape: ModelShape, train: TrainConfig | None = None, free: int | None = None) -> Fit:
    """The run with `train` (default: cfg.train) on this machine's device (`free`: bytes free there, measured if
    not given)."""
    train = train or cfg.train
    device = machine.device()
    cuda = device.type == "cuda"
    estimate = estimate_memory(
        shape,
        train,
        row_tokens(cfg),
        bf16_compute=cuda and torch.cuda.is_bf16_supported(),
        attn_implementation=cfg.model.attn_implementation,
    )
    # GPUs: one per process; CPU: every process in the same RAM
    needed = estimate.peak + CUDA_CONTEXT if cuda else estimate.peak * train.num_processes
    free = accelerator.free_memory(device) if free is None else free
    return Fit(estimate, needed, int(free * cfg.cost.usable_memory), accelerator.device_name(device))


def alternatives(train: TrainConfig, cuda: bool, gguf: bool, gpus: int) -> list[tuple[str, TrainConfig]]:
    """Settings that need less memory and keep the objective, cheapest change first: the same effective batch in
    smaller micro-batches, gradient checkpointing, an adapter instead of full weights, a 4-bit base, more
    processes sharding the model."""
    out: list[tuple[str, TrainConfig]] = []

    def add(changes: dict[str, Any]) -> None:
        text = " ".join(f"train.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items())
        try:
            out.append((text, train.model_copy(update=changes)))
        except ValueError:
            pass

    micro = train.micro_batch_size
    smaller = [m for m in (micro // 2, micro // 4, micro // 8, 1) if 0 < m < micro and micro % m == 0]
    for m in dict.fromkeys(smaller):
        add({"micro_batch_size": m, "grad_accum_steps": train.grad_accum_steps * micro // m})
    if not train.gradient_checkpointing:
        add({"gradient_checkpointing": True})
        for m in dict.fromkeys(smaller):
            add(
                {
                    "gradient_checkpointing": True,
                    "micro_batch_size": m,
                    "grad_accum_steps": train.grad_accum_steps * micro // m,
                }
            )
    if train.method == "full":
        add({"method": "lora"})
        add({"method": "lora", "gradient_checkpointing": True})
    if cuda and not gguf and train.method != "qlora":
        add({"method": "qlora", "param_dtype": "float32", "gradient_checkpointing": True})
    for n in (2, 4, 8):
        if cuda and train.num_processes < n <= gpus:
            add({"num_processes": n, "distributed": "fsdp"})
    return out


def settings_that_fit(cfg: Config, shape: ModelShape, free: int, most: int = 3) -> list[str]:
    cuda = machine.cuda_available()
    gpus = torch.cuda.device_count() if cuda else 0
    found = []
    for text, train in alternatives(cfg.train, cuda, shape.gguf, gpus):
        fit = fit_of(cfg, shape, train, free)
        if fit.fits:
            found.append(f"{text} (needs {gib(fit.needed)})")
        if len(found) == most:
            break
    return found


def describe(fit: Fit, cfg: Config) -> str:
    e, train = fit.estimate, cfg.train
    return (
        f"needs an estimated {gib(fit.needed)} on {fit.device} (per process: weights {gib(e.weights)}, gradients "
        f"{gib(e.gradients)}, AdamW states {gib(e.optimizer)}, activations {gib(e.activations)} for "
        f"micro_batch_size {train.micro_batch_size} x {row_tokens(cfg)} tokens"
        + (", loading " + gib(e.weights + e.loading) if e.loading and e.peak > e.training else "")
        + f"; {train.method}, {train.num_processes} process(es)"
        + (", gradient checkpointing" if train.gradient_checkpointing else "")
        + f"), {gib(fit.usable)} usable ({int(100 * cfg.cost.usable_memory)}% of what is free)"
    )


def refuse_if_too_big(cfg: Config) -> None:
    """The train stage's pre-flight (cost.preflight): stop in one line, before any weight loads, when the run
    cannot fit, naming settings that would."""
    if not cfg.cost.preflight:
        return
    try:
        shape = model_shape(cfg.model)
    except ModelError:
        return  # the load that follows says what is wrong with model.base, in the words it always has
    fit = fit_of(cfg, shape)
    if fit.fits:
        return
    fixes = settings_that_fit(cfg, shape, int(fit.usable / cfg.cost.usable_memory))
    advice = (
        "settings that fit: " + ", or ".join(fixes)
        if fixes
        else "none of micro-batch, gradient checkpointing, LoRA/QLoRA or more processes fits here: a smaller "
        "model.max_length, a smaller model or a device with more memory"
    )
    raise TrainingError(
        f"train: this run cannot fit: it {describe(fit, cfg)}; {advice} (cost.preflight=false trains anyway)"
    )
