"""What a training run cost, measured around the loop, never inside it: wall time per phase of the stage, tokens
per second (all non-padding, and supervised), model FLOPs utilisation against the device's dense peak, peak memory
(accelerator allocated and reserved, process RSS), device-hours, energy where the device reports it, and with
cost.per_device_hour the price. The loop calls `after_step` as one of its step hooks; the stage marks its phases."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sftops import accelerator
from sftops.config import CostConfig
from sftops.train.distributed import World


@dataclass(frozen=True)
class MatmulParams:
    """A model's matrix-multiply weights, as model FLOPs count them: the decoder's (per non-padding token) and the
    LM head's (per supervised token: the objective runs the head on those alone), frozen or trained, and the
    attention's width per layer (the scores and the weighted sum cost 2 x width x context FLOPs per token)."""

    frozen: int
    trained: int
    head_frozen: int
    head_trained: int
    layers: int
    attention_width: int


def matmul_params(model: torch.nn.Module) -> MatmulParams:
    """Counted from the model as it trains (LoRA adapters included; a 4-bit layer by its shape, not its packing)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal_lm.get_output_embeddings()
    counts = {"frozen": 0, "trained": 0, "head_frozen": 0, "head_trained": 0}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            where = "head_" if module is head else ""
            trains = module.weight.requires_grad
            counts[f"{where}{'trained' if trains else 'frozen'}"] += module.in_features * module.out_features
    config = causal_lm.config
    width = getattr(config, "num_attention_heads", 0) * (
        getattr(config, "head_dim", None) or config.hidden_size // max(getattr(config, "num_attention_heads", 1), 1)
    )
    return MatmulParams(**counts, layers=getattr(config, "num_hidden_layers", 0), attention_width=width)


def training_flops(shape: MatmulParams, tokens: float, supervised: float, rows: float) -> float:
    """Model FLOPs of training on `tokens` non-padding tokens in `rows` conversations, `supervised` of them
    targets: 2 per weight forward, 2 more for the input's gradient, 2 more for a trained weight's own gradient;
    causal attention over a mean context of half a conversation, forward and twice that backward. Recomputation
    (gradient checkpointing) is not counted: MFU measures useful work."""
    body = 4 * shape.frozen + 6 * shape.trained
    head = 4 * shape.head_frozen + 6 * shape.head_trained
    mean_length = tokens / max(rows, 1)
    attention = 3 * 2 * shape.layers * shape.attention_width * mean_length
    return tokens * (body + attention) + supervised * head


@dataclass
class CostMeter:
    """Measures one run of the train stage on this process; `figures` says what it cost."""

    cfg: CostConfig
    world: World
    started: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)
    tokens: float = 0.0
    supervised_tokens: float = 0.0
    rows: float = 0.0
    step_seconds: float = 0.0
    steps: int = 0
    energy_start_mj: int | None = None

    def __post_init__(self) -> None:
        accelerator.reset_peak_memory(self.world.device)
        self.energy_start_mj = accelerator.energy_counter_mj(self.world.device)
        self._last = self.started

    def mark(self, phase: str) -> None:
        """The phase that ends now (load, setup, train, export), timed from the end of the previous one."""
        now = time.monotonic()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now

    def after_step(self, step: int, record: dict[str, float]) -> None:
        """The loop's step hook: the step's tokens (all processes) and the time its forward, backward and update
        took."""
        self.steps += 1
        self.tokens += record.get("tokens", record["supervised_tokens"])
        self.supervised_tokens += record["supervised_tokens"]
        self.rows += record["rows"]
        self.step_seconds += record["step_seconds"]

    def figures(self, model: torch.nn.Module) -> dict[str, Any]:
        """What the run cost so far, as run.json keeps it (MLflow gets `metrics(figures)`)."""
        device = self.world.device
        wall = time.monotonic() - self.started
        train_s = self.phases.get("train", wall)
        devices = self.world.size  # a GPU per process; on CPU, the processes share the machine's cores
        device_hours = wall / 3600 * (devices if device.type == "cuda" else 1)
        peak = accelerator.dense_peak_tflops(device, self.cfg.peak_tflops)
        flops = training_flops(matmul_params(model), self.tokens, self.supervised_tokens, self.rows)
        memory = accelerator.peak_memory(device)
        energy = self._energy_kwh()
        price = self.cfg.per_device_hour
        return {
            "device": accelerator.device_name(device),
            "devices": devices if device.type == "cuda" else 1,
            "processes": self.world.size,
            "wall_s": wall,
            "wall_s_by_phase": dict(self.phases),
            "steps_measured": self.steps,  # this run's (a resumed job's earlier runs are not in these figures)
            "tokens": self.tokens,
            "supervised_tokens": self.supervised_tokens,
            "tokens_per_s": self.tokens / train_s if train_s else None,
            "supervised_tokens_per_s": self.supervised_tokens / train_s if train_s else None,
            "step_s_mean": self.step_seconds / self.steps if self.steps else None,
            "model_flops": flops,
            "peak_tflops": peak,
            "mfu": flops / (self.step_seconds * devices * peak * 1e12) if peak and self.step_seconds else None,
            "mfu_note": None
            if peak
            else f"not computed: no dense peak known for {accelerator.device_name(device)} (set cost.peak_tflops)",
            "peak_allocated_gib": _gib(memory["allocated"]),
            "peak_reserved_gib": _gib(memory["reserved"]),
            "peak_rss_gib": _gib(memory["rss"]),
            "device_hours": device_hours,
            "energy_kwh": energy,
            "energy_note": None if energy is not None else "not reported by the device (NVML energy counter)",
            "per_device_hour": price,
            "currency": self.cfg.currency,
            "amount": device_hours * price if price is not None else None,
        }

    def _energy_kwh(self) -> float | None:
        """This process's GPU's energy over the run, times the processes (each drives a GPU like it)."""
        end = accelerator.energy_counter_mj(self.world.device)
        if end is None or self.energy_start_mj is None:
            return None
        return (end - self.energy_start_mj) / 3.6e9 * self.world.size


def _gib(value: int | None) -> float | None:
    return value / accelerator.GIB if value is not None else None


def metrics(figures: dict[str, Any]) -> dict[str, float]:
    """The figures as MLflow metrics (cost/...), numbers only: a scheduled deployment's runs side by side in the UI."""
    out = {f"cost/{k}": float(v) for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out |= {f"cost/wall_s/{phase}": seconds for phase, seconds in figures["wall_s_by_phase"].items()}
    return out
