"""What `sftops plan` answers: the model's size, the estimated peak memory of the configured run against the
device, the settings that would fit if it does not, and with measured steps the time per step and of the run."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from sftops.config import Config
from sftops.plan.fit import describe, fit_of, gib, settings_that_fit
from sftops.plan.model_shape import model_shape
from sftops.train.setup import total_steps


def planned_steps(cfg: Config) -> int | None:
    """The optimizer steps of the configured run, from the curated train split's row count (None before format)."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    train = Path(cfg.paths.curated) / "train.parquet"
    if not train.exists():
        return None
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(train).metadata.num_rows
    rows = min(rows, cfg.train.max_train_rows or rows)
    return total_steps(rows, cfg.train, cfg.train.num_processes)


def plan(cfg: Config, config_json: Path | None = None, measure_steps: int = 0) -> dict[str, Any]:
    shape = model_shape(cfg.model, config_json)
    fit = fit_of(cfg, shape)
    out: dict[str, Any] = {
        "model": {k: v for k, v in asdict(shape).items() if k != "linears"},
        "settings": {
            "method": cfg.train.method,
            "micro_batch_size": cfg.train.micro_batch_size,
            "max_length": cfg.model.max_length,
            "gradient_checkpointing": cfg.train.gradient_checkpointing,
            "num_processes": cfg.train.num_processes,
            "distributed": cfg.train.distributed,
        },
        "estimate": {"params": fit.estimate.params, "trainable_params": fit.estimate.trainable_params}
        | {f"{k}_bytes": v for k, v in fit.estimate.parts().items()},
        "device": fit.device,
        "needed_bytes": fit.needed,
        "usable_bytes": fit.usable,
        "fits": fit.fits,
        "summary": describe(fit, cfg),
        "settings_that_fit": []
        if fit.fits
        else settings_that_fit(cfg, shape, int(fit.usable / cfg.cost.usable_memory)),
        "planned_steps": planned_steps(cfg),
    }
    if measure_steps:
        from sftops.plan.steps import measure_steps as measure

        measured = measure(cfg, measure_steps)
        out["measured"] = measured
        if out["planned_steps"]:
            out["expected_train_s"] = measured["step_s"] * out["planned_steps"]
    return out


def render(p: dict[str, Any]) -> str:
    m, e = p["model"], p["estimate"]
    lines = [
        f"model: {m['model_type']}, {m['layers']} layers, hidden {m['hidden']}, vocab {m['vocab']}: "
        f"{e['params']:,} parameters, {e['trainable_params']:,} trainable ({p['settings']['method']})",
        f"memory: {'fits' if p['fits'] else 'DOES NOT FIT'}: the run {p['summary']}",
    ]
    if p["settings_that_fit"]:
        lines.append("settings that fit: " + "; ".join(p["settings_that_fit"]))
    if "measured" in p:
        r = p["measured"]
        lines.append(
            f"measured: {r['step_s']:.2f} s per optimizer step over {r['steps']} steps after a "
            f"{r['warmup_step_s']:.2f} s warm-up, on {r['device']}; peak {gib(r['peak_bytes'])} "
            f"({r['peak_counts']}) against {gib(e['training_bytes'])} estimated for training"
        )
    steps = p["planned_steps"]
    if steps and "expected_train_s" in p:
        lines.append(
            f"time: {steps} planned steps x {p['measured']['step_s']:.2f} s = "
            f"about {p['expected_train_s'] / 60:.1f} min"
        )
    elif steps:
        lines.append(f"time: {steps} planned steps (--measure-steps N times a few to say how long)")
    else:
        lines.append("time: planned steps unknown until the format stage has run (or set train.max_steps)")
    return "\n".join(lines)
