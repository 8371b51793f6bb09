"""Fine-tuning methods on top of a loaded base model (full, LoRA, DoRA, QLoRA), and merging an adapter into
its base for export."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from sftops.config import TrainConfig
from sftops.errors import TrainingError


def apply_method(model: PreTrainedModel, cfg: TrainConfig) -> torch.nn.Module:
    """Mark what trains: every weight (full) or a freshly initialised adapter on a frozen base. With
    cfg.param_dtype bfloat16 the base weights are cast to bf16; a LoRA adapter stays float32 (peft's default,
    it is small), so only full fine-tuning has bf16 master weights."""
    if cfg.param_dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with a frozen base (no input-grad hooks needed).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        use_dora=cfg.method == "dora",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def merge_checked(
    model: torch.nn.Module, held_out_nll: Callable[[torch.nn.Module], float], tolerance: float
) -> tuple[PreTrainedModel, dict[str, float]]:
    """Fold the adapter into the base weights and prove it changed nothing: the merged model's held-out NLL
    must equal the adapter model's within `tolerance` (relative), or the export fails."""
    adapter_nll = held_out_nll(model)
    merged = model.merge_and_unload()
    merged_nll = held_out_nll(merged)
    drift = abs(merged_nll - adapter_nll) / max(abs(adapter_nll), 1e-12)
    check = {"adapter_nll": adapter_nll, "merged_nll": merged_nll, "relative_drift": drift}
    if drift > tolerance:
        raise TrainingError(
            f"merged model's held-out NLL {merged_nll:.6f} differs from the adapter model's {adapter_nll:.6f} by "
            f"{drift:.2e} (relative), above train.merge_tolerance={tolerance}; "
            "export the adapter (train.merge_adapter=false)"
        )
    return merged, check
