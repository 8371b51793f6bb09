"""Stage 3, train: encode the curated conversations, fine-tune (LoRA or full), save, track, register."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from sftops import faults, hub, tracking
from sftops.config import Config, ModelConfig
from sftops.data.examples import split_examples
from sftops.errors import TrainingError
from sftops.jsonio import read_json, write_json
from sftops.layout import INGEST_REPORT, MODEL_DIR, RUN_FILE, STATS
from sftops.machine import require_hardware
from sftops.modeling import load_base_model, load_tokenizer, pinned, save_finetuned
from sftops.outputs import replaced_whole
from sftops.provenance.manifest import resolved_revisions
from sftops.train import distributed, launch
from sftops.train.curves import write_curves
from sftops.train.distributed import World, agree, join, leave, under_torchrun
from sftops.train.loop import seed_everything, train_loop
from sftops.train.lora import apply_method, merge_checked
from sftops.train.loss import mean_nll, score_rows
from sftops.train.packing_check import packing_self_check

# One line per optimizer step: what an orchestrator's log view (Prefect's) shows of training progress.
log = logging.getLogger(__name__)


def checkpoint_folder(cfg: Config, base_revision: str | None = None) -> Path:
    """Checkpoints of this exact training job (model, train params, curated data): a re-run of the same job
    resumes; a changed one starts afresh in its own folder. How many processes run it, and how each process
    splits its share into accumulation steps, is not part of the job: a sharded job resumes on any number of
    processes that takes the same micro-batches per step (training.same_batches_per_step). base_revision: the hub
    commit model.revision resolved to (a branch that moved on is another base: training starts afresh)."""
    train = cfg.train.model_dump(mode="json", exclude={"num_processes", "grad_accum_steps"})
    model = cfg.model.model_dump(mode="json")
    if hub.is_commit(base_revision):
        model["revision"] = base_revision
    job = {"model": model, "train": train, "data": tracking.dvc_md5(Path(cfg.paths.curated))}
    digest = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.paths.checkpoints) / digest


def gather_unsharded(model: torch.nn.Module, cfg: Config, base: ModelConfig, world: World) -> torch.nn.Module:
    """FSDP: every process sends its shards; the main process gets a plain, unsharded copy to evaluate and save."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return model
    plain = apply_method(load_base_model(base), cfg.train)
    plain.load_state_dict(state)
    return plain.to(world.device).eval()


def run_train(cfg: Config) -> dict[str, Any]:
    require_hardware(cfg.train.method, cfg.model.attn_implementation)
    if cfg.launch.target != "local" and not under_torchrun():  # a cluster (or loopback) runs it; wait for its result
        launch.submit(cfg)
        return read_json(Path(cfg.paths.model) / RUN_FILE)
    if cfg.train.num_processes > 1 and not under_torchrun():
        with tempfile.TemporaryDirectory() as tmp:
            params = Path(tmp) / "params.yaml"
            params.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            distributed.launch(cfg.train.num_processes, params)
        return read_json(Path(cfg.paths.model) / RUN_FILE)
    world = join()
    try:
        base = pinned(cfg.model)  # each process resolves model.revision; agree() checks they found the same commit
        agree(world, {**same_job(cfg), "base model revision": str(base.revision)})
        return _train(cfg, base, world)
    finally:
        leave()


def same_job(cfg: Config) -> dict[str, str]:
    """What every process of one job must share: the params (where each node keeps its files aside) and the data."""
    params = cfg.model_dump(mode="json", exclude={"paths", "launch"})
    return {
        "params digest": hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12],
        "curated data hash": tracking.dvc_md5(Path(cfg.paths.curated)),
    }


def _train(cfg: Config, base_cfg: ModelConfig, world: World) -> dict[str, Any]:
    """base_cfg: cfg.model pinned to the revision it resolved to, which every load uses and the run records."""
    tokenizer = load_tokenizer(base_cfg)
    pad = tokenizer.pad_token_id
    # The format stage's tokenised cache (memory-mapped) when it matches this tokenizer and max_length, else
    # tokenised here; max_train_rows draws its sample from the split's row ids only.
    train = split_examples(cfg, tokenizer, "train", cfg.train.max_train_rows, cfg.train.seed)
    val = split_examples(cfg, tokenizer, "val")
    train_ex, train_counts, val_ex, val_counts = train.examples, train.counts, val.examples, val.counts
    sources, source_names = train.sources, train.source_names
    dev = world.device
    seed_everything(cfg.train.seed)  # before the LoRA matrices are initialised
    base = load_base_model(base_cfg, quantize_4bit=cfg.train.method == "qlora")
    model = apply_method(base, cfg.train)
    if cfg.train.method != "qlora":  # a 4-bit model is placed on its GPU as it loads
        model = model.to(dev)
    if cfg.train.packing:
        packing_self_check(model, train_ex, pad, dev, cfg.model.attn_implementation)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    def held_out_nll(m: torch.nn.Module) -> float:
        return mean_nll(score_rows(m, val_ex, cfg.train.micro_batch_size, pad, dev))

    reports = [
        Path(cfg.paths.curated) / INGEST_REPORT,
        Path(cfg.paths.curated) / STATS,
    ]  # the ingest report, as format copied it
    revisions = resolved_revisions(cfg, base_cfg.revision)
    run_context = tracking.pipeline_run(cfg, reports, revisions) if world.is_main else contextlib.nullcontext({})
    with run_context as run:
        if world.is_main:
            tracking.log_metrics(
                {"trainable_params": trainable, "total_params": total, "train_examples": len(train_ex)}
            )

        def validate(step: int) -> float | None:
            if not val_ex:
                return None
            nll = held_out_nll(model)
            if world.is_main:
                tracking.log_metrics({"val_nll": nll}, step=step)
            return nll

        val_before = validate(0)
        checkpoints = checkpoint_folder(cfg, base_cfg.revision)
        step_of = {"step": 0}

        def on_step(step: int, record: dict[str, float]) -> None:
            step_of["step"] = step
            tracking.log_step(step, record)
            log.info(
                "train step %d: train_loss %.4f, learning_rate %.3g",
                step,
                record["train_loss"],
                record["learning_rate"],
            )

        result = train_loop(
            model,
            train_ex,
            cfg.train,
            pad,
            world,
            sources=sources,
            source_names=source_names,
            checkpoints=checkpoints,
            validate=(lambda: validate(step_of["step"])) if val_ex else None,
            on_step=on_step,
        )
        if world.is_main:
            faults.pause("tracking_flush")
            tracking.flush()  # metrics buffered while the server was away; a TrackingError if it still is
        if world.size > 1 and cfg.train.distributed == "fsdp":
            model = gather_unsharded(model, cfg, base_cfg, world)
        if not world.is_main:
            return {}
        # The previous models/ stays until the new one is complete (a failed export leaves it usable).
        with replaced_whole(cfg.paths.model) as out:
            val_after = held_out_nll(model) if val_ex else None
            val_points = {
                0: val_before,
                **{v["step"]: v["val_nll"] for v in result["validations"]},
                result["steps"]: val_after,
            }
            write_curves(out, result["history"], val_points)  # the DVC plots of dvc.yaml
            manifest = {
                "method": cfg.train.method,
                "weights": "full" if cfg.train.method == "full" else "adapter",
                "base": base_cfg.model_dump(mode="json"),
            }  # its revision: the commit (package version) loaded
            merge = None
            if cfg.train.merge_adapter:
                if not val_ex:
                    raise TrainingError(
                        "train.merge_adapter needs validation rows to check the merge on; raise data.val_fraction"
                    )
                model, merge = merge_checked(model, held_out_nll, cfg.train.merge_tolerance)
                manifest["weights"] = "full"
                tracking.log_metrics({f"merge_{k}": v for k, v in merge.items()})
            save_finetuned(model, tokenizer, out / MODEL_DIR, manifest)
            registered = tracking.log_and_register_model(out / MODEL_DIR, cfg.tracking.registered_model_name)
            report = {
                **run,
                **registered,
                "steps": result["steps"],
                "planned_steps": result["planned_steps"],
                "best_step": result["best_step"],
                "stopped_early": result["stopped_early"],
                "resumed_from_step": result["resumed_from_step"],
                "final_train_loss": result["history"][-1]["train_loss"],
                "history": result["history"],
                "validations": result["validations"],
                "val_nll_before": val_before,
                "val_nll_after": val_after,
                "merge": merge,
                "encoding": {"train": train_counts, "val": val_counts},
                "trainable_params": trainable,
                "device": str(dev),
                "processes": world.size,
            }
            write_json(out / RUN_FILE, report)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the job is done and exported
    return report
