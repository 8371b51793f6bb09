"""The trained model's files: gathered from its FSDP shards, the adapter merged into the base where configured
(and proven not to change the held-out loss), saved with its tokenizer and a manifest of how to load it, and the
loss curves beside it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sftops.config import Config, ModelConfig
from sftops.errors import TrainingError
from sftops.layout import MODEL_DIR
from sftops.modeling import load_base_model, save_finetuned
from sftops.train.curves import write_curves, write_suite_rows
from sftops.train.distributed import World
from sftops.train.lora import apply_method, merge_checked


def gather_unsharded(model: torch.nn.Module, cfg: Config, base: ModelConfig, world: World) -> torch.nn.Module:
    """FSDP: every process sends its shards; the main process gets a plain, unsharded copy to evaluate and save
    (the others keep their sharded model). Collective: every process calls it. Without FSDP, the model itself."""
    if world.size == 1 or cfg.train.distributed != "fsdp":
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return model
    plain = apply_method(load_base_model(base), cfg.train)
    plain.load_state_dict(state)
    return plain.to(world.device).eval()


@dataclass(frozen=True)
class Exported:
    model_dir: Path
    merge: dict[str, float] | None  # the merge check (adapter and merged held-out NLL) when the adapter was merged


def export_model(
    folder: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: Config,
    base: ModelConfig,
    held_out_nll: Callable[[torch.nn.Module], float] | None,
) -> Exported:
    """Save the model into folder/model: the adapter, or full weights (merged when train.merge_adapter, checked
    on the validation rows by `held_out_nll`), with the manifest naming the base at the revision loaded."""
    manifest = {
        "method": cfg.train.method,
        "weights": "full" if cfg.train.method == "full" else "adapter",
        "base": base.model_dump(mode="json"),
    }
    merge = None
    if cfg.train.merge_adapter:
        if held_out_nll is None:
            raise TrainingError(
                "train.merge_adapter needs validation rows to check the merge on; raise data.val_fraction"
            )
        model, merge = merge_checked(model, held_out_nll, cfg.train.merge_tolerance)
        manifest["weights"] = "full"
    save_finetuned(model, tokenizer, folder / MODEL_DIR, manifest)
    return Exported(folder / MODEL_DIR, merge)


def write_loss_curves(
    folder: Path,
    history: list[dict[str, float]],
    validations: list[dict[str, float]],
    before: float | None,
    after: float | None,
    steps: int,
) -> None:
    """The DVC plots: the training loss per step, and the validation NLL before training, at each validation and
    of the weights exported."""
    points = {0: before, **{v["step"]: v["val_nll"] for v in validations}, steps: after}
    write_curves(folder, history, points)


def write_suite_curve(
    folder: Path, baseline: dict[str, Any], before: float | None, validations: list[dict[str, Any]]
) -> None:
    """suite_curve.csv, the DVC plot of forgetting: one row per suite and validation (step 0: before training)
    with the validation NLL and the suite's figures on its fixed sample (train/forgetting.py); absent when no suite
    was scored during training."""
    if baseline:
        write_suite_rows(folder, [{"step": 0, "val_nll": before, "broken": "", **baseline}, *validations])
