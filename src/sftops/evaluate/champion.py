"""The champion measured alone, for the promotion gate: when today's champion has no result on a challenger's test
split with its settings, the gate (tracking.registry.promote) measures it there first, as the evaluate stage
measures the tuned model. The pipeline flow's promote step builds the measurer on every run and uses it rarely:
the model code loads only when a champion is measured."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sftops.config import Config


def measure_model(cfg: Config, model_dir: Path, curated: Path) -> tuple[dict[str, Any], dict[str, list]]:
    """One model alone on the test split in `curated`: its metrics with their evaluation identity, and its
    generations table."""
    from sftops.evaluate.held_out import prompt_text, read_test_split
    from sftops.evaluate.identity import evaluation_identity
    from sftops.evaluate.sides import run_side
    from sftops.machine import device
    from sftops.modeling import load_finetuned

    local = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"curated": str(curated)})})
    dev = device()
    model, tokenizer = load_finetuned(model_dir)
    model.to(dev)
    data = read_test_split(local, tokenizer)
    side = run_side(model, tokenizer, data, local, dev, "champion")
    metrics = {
        "test_rows": len(data.examples),
        "test_target_tokens": sum(c for _, c in side.scores),
        "generations": len(data.sample),
        "tuned": side.summary(),
        "evaluation": evaluation_identity(local, curated / "test.parquet", tokenizer),
    }
    table = {
        "id": [r["id"] for r in data.sample],
        "prompt": [prompt_text(r["messages"]) for r in data.sample],
        "reference": [r[0] for r in data.refs],
        "tuned_output": side.texts(),
        **{f"tuned_{name}": values for name, values in side.generated.items()},
    }
    return metrics, table


def measurer(cfg: Config) -> Callable[[Path, Path], tuple[dict[str, Any], dict[str, list]]]:
    """For the promotion gate: measure a model folder on a curated folder's test split with these evaluation
    settings."""
    return lambda model_dir, curated: measure_model(cfg, model_dir, curated)
