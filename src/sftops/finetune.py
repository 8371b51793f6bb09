"""Stage 3, train: encode the curated conversations, fine-tune (LoRA or full), save, track, register."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from sftops import tracking
from sftops.chat import encode_rows
from sftops.config import Config, TrainConfig
from sftops.curate import STATS
from sftops.curves import write_curves
from sftops.ingest import REPORT
from sftops.jsonio import read_jsonl, require, write_json
from sftops.modeling import load_base_model, load_tokenizer, save_finetuned
from sftops.objective import mean_nll, score_rows
from sftops.training import seed_everything, train_loop


def device() -> torch.device:
    """The GPU when there is one (detected, not configured), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def apply_method(model: PreTrainedModel, cfg: TrainConfig) -> torch.nn.Module:
    if cfg.method == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def load_split(cfg: Config, split: str) -> list[dict[str, Any]]:
    return list(read_jsonl(require(Path(cfg.paths.curated) / f"{split}.jsonl", "format")))


def run_train(cfg: Config) -> dict[str, Any]:
    out = Path(cfg.paths.model)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tokenizer = load_tokenizer(cfg.model)
    train_rows, val_rows = load_split(cfg, "train"), load_split(cfg, "val")
    if cfg.train.max_train_rows is not None and len(train_rows) > cfg.train.max_train_rows:
        train_rows = random.Random(cfg.train.seed).sample(train_rows, cfg.train.max_train_rows)
    train_ex, _, train_counts = encode_rows(tokenizer, train_rows, cfg.model.max_length)
    val_ex, _, val_counts = encode_rows(tokenizer, val_rows, cfg.model.max_length)
    dev = device()
    seed_everything(cfg.train.seed)  # before the LoRA matrices are initialised
    model = apply_method(load_base_model(cfg.model), cfg.train).to(dev)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    with tracking.pipeline_run(cfg, [Path(cfg.paths.raw) / REPORT, Path(cfg.paths.curated) / STATS]) as run:
        encoding = {"train": train_counts, "val": val_counts}
        tracking.log_metrics({"trainable_params": trainable, "total_params": total, "train_examples": len(train_ex)})

        def validation_nll(step: int) -> float | None:
            if not val_ex:
                return None
            nll = mean_nll(score_rows(model, val_ex, cfg.train.micro_batch_size, tokenizer.pad_token_id, dev))
            tracking.log_metrics({"val_nll": nll}, step=step)
            return nll

        val_before = validation_nll(0)
        result = train_loop(model, train_ex, cfg.train, tokenizer.pad_token_id, dev, on_step=tracking.log_step)
        val_after = validation_nll(result["steps"])
        write_curves(out, result["history"], {0: val_before, result["steps"]: val_after})  # DVC plots

        manifest = {"method": cfg.train.method, "base": cfg.model.model_dump(mode="json")}
        save_finetuned(model, tokenizer, out / "model", manifest)
        registered = tracking.log_and_register_model(out / "model", cfg.tracking.registered_model_name)
        report = {
            **run,
            **registered,
            "steps": result["steps"],
            "final_train_loss": result["history"][-1]["train_loss"],
            "val_nll_before": val_before,
            "val_nll_after": val_after,
            "encoding": encoding,
            "trainable_params": trainable,
            "device": str(dev),
        }
        write_json(out / tracking.RUN_FILE, report)
    return report
