"""Stage 3, train: encode the curated conversations, fine-tune (LoRA or full), save, track, register."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from sftops import faults
from sftops.config import Config, ModelConfig
from sftops.data.examples import SplitExamples, split_examples
from sftops.jsonio import read_json, write_json
from sftops.layout import RUN_FILE
from sftops.machine import require_hardware
from sftops.modeling import load_base_model, load_tokenizer, pinned
from sftops.outputs import replaced_whole
from sftops.plan.fit import refuse_if_too_big
from sftops.provenance.manifest import dvc_md5, resolved_revisions
from sftops.tracking.models import register_model
from sftops.tracking.runs import NOT_TRACKED, TrainingRun, pipeline_run
from sftops.train import cost, distributed, launch
from sftops.train.checkpoint import checkpoint_folder
from sftops.train.distributed import World, agree, join, leave, under_torchrun
from sftops.train.export import export_model, gather_unsharded, write_loss_curves, write_suite_curve
from sftops.train.forgetting import Forgetting, selection_of, start_forgetting
from sftops.train.loop import LoopResult, StepHook, train_loop
from sftops.train.lora import apply_method
from sftops.train.loss import mean_nll, score_rows
from sftops.train.packing_check import packing_self_check
from sftops.train.setup import seed_everything

# One line per optimizer step: what an orchestrator's log view (Prefect's) shows of training progress.
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What the train stage did: run.json holds it, the evaluate stage and the pipeline flow read it back."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    model_uri: str
    registered_model: str
    version: str
    steps: int
    planned_steps: int
    best_step: int
    stopped_early: bool
    resumed_from_step: int | None
    final_train_loss: float
    history: list[dict[str, float]]
    validations: list[dict[str, Any]]  # per validation: step, val_nll, broken (suite budgets), suite figures
    selection: dict[str, Any]  # the step exported and why (train/forgetting.py:selection_of)
    suite_baseline: dict[str, float]  # the suites' figures before the first step
    val_nll_before: float | None
    val_nll_after: float | None
    merge: dict[str, float] | None
    encoding: dict[str, dict[str, Any]]
    trainable_params: int
    device: str
    processes: int
    cost: dict[str, Any] | None = None  # what the run cost (train/cost.py); None in a run.json older than it


def run_train(cfg: Config) -> TrainResult:
    require_hardware(cfg.train.method, cfg.model.attn_implementation)
    if cfg.launch.target != "local" and not under_torchrun():  # a cluster (or loopback) runs it; wait for its result
        launch.submit(cfg)
        return TrainResult(**read_json(Path(cfg.paths.model) / RUN_FILE))
    refuse_if_too_big(cfg)  # before any weight loads: a run that cannot fit stops here, naming settings that would
    if cfg.train.num_processes > 1 and not under_torchrun():
        with tempfile.TemporaryDirectory() as tmp:
            params = Path(tmp) / "params.yaml"
            params.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            distributed.launch(cfg.train.num_processes, params)
        return TrainResult(**read_json(Path(cfg.paths.model) / RUN_FILE))
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
        "curated data hash": dvc_md5(Path(cfg.paths.curated)),
    }


def _train(cfg: Config, base_cfg: ModelConfig, world: World) -> TrainResult | None:
    """base_cfg: cfg.model pinned to the revision it resolved to, which every load uses and the run records.
    Returns the result on the main process, None on the others."""
    meter = cost.CostMeter(cfg.cost, world)
    tokenizer = load_tokenizer(base_cfg)
    train = split_examples(cfg, tokenizer, "train", cfg.train.max_train_rows, cfg.train.seed)
    val = split_examples(cfg, tokenizer, "val")
    model = build_model(cfg, base_cfg, world, train, tokenizer.pad_token_id)
    held_out = HeldOut(val, cfg.train.micro_batch_size, tokenizer.pad_token_id, world.device)
    checkpoints = checkpoint_folder(cfg, base_cfg.revision)
    meter.mark("load")
    with tracked_run(cfg, base_cfg, world) as run:
        size = model_size(model)
        # params, not metrics: a constant drawn as a chart is a chart of one bar
        run.log_params(size | {"train_examples": len(train.examples)})
        val_before = held_out.validate(model, 0, run)
        started = time.perf_counter()
        watch = start_forgetting(cfg, model, tokenizer, world.device) if held_out else None
        watch_start_s = time.perf_counter() - started
        meter.mark("setup")
        result = train_loop(
            model,
            train.examples,
            cfg.train,
            tokenizer.pad_token_id,
            world,
            sources=train.sources,
            source_names=train.source_names,
            checkpoints=checkpoints,
            validate=(lambda step: validation(model, step, run, held_out, watch)) if held_out else None,
            on_step=[*step_hooks(run, world), meter.after_step],
        )
        meter.mark("train")
        run.log_history(result.history[: result.resumed_from_step or 0])
        faults.pause("tracking_flush")
        run.flush()  # metrics buffered while the server was away; a TrackingError if it still is
        model = gather_unsharded(model, cfg, base_cfg, world)
        if not world.is_main:
            return None
        baseline = {**watch.baseline(), "suites_s": watch_start_s} if watch else {}
        trained = Trained(
            result, val_before, size["trainable_params"], {"train": train.counts, "val": val.counts}, baseline
        )
        report = export(cfg, base_cfg, model, tokenizer, run, trained, held_out, world, meter)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the job is done and exported
    return report


def build_model(cfg: Config, base_cfg: ModelConfig, world: World, train: SplitExamples, pad: int) -> torch.nn.Module:
    """The base model with the training method applied (LoRA, DoRA, QLoRA or full), on the device; with packing,
    proven first to score packed rows as it scores them padded."""
    seed_everything(cfg.train.seed)  # before the LoRA matrices are initialised
    base = load_base_model(base_cfg, quantize_4bit=cfg.train.method == "qlora")
    model = apply_method(base, cfg.train)
    if cfg.train.method != "qlora":  # a 4-bit model is placed on its GPU as it loads
        model = model.to(world.device)
    if cfg.train.packing:
        packing_self_check(model, train.examples, pad, world.device, cfg.model.attn_implementation)
    return model


def model_size(model: torch.nn.Module) -> dict[str, int]:
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
    }


@dataclass(frozen=True)
class HeldOut:
    """The validation split's response NLL, as training validates and the export checks a merge; falsy when the
    split is empty."""

    val: SplitExamples
    batch_size: int
    pad: int
    device: torch.device

    def __bool__(self) -> bool:
        return bool(self.val.examples)

    def nll(self, model: torch.nn.Module) -> float:
        return mean_nll(score_rows(model, self.val.examples, self.batch_size, self.pad, self.device))

    def validate(self, model: torch.nn.Module, step: int, run: TrainingRun) -> float | None:
        if not self:
            return None
        nll = self.nll(model)
        run.log_metrics({"val_nll": nll}, step=step)
        return nll


def validation(
    model: torch.nn.Module, step: int, run: TrainingRun, held_out: HeldOut, watch: Forgetting | None
) -> dict[str, Any]:
    """A validation as the loop chooses checkpoints by it: the validation NLL, each suite's figures on its fixed
    sample (per-step curves in MLflow), and the suite budgets this step breaks."""
    figures: dict[str, Any] = {"val_nll": held_out.validate(model, step, run), "broken": ""}
    if watch:
        started = time.perf_counter()
        figures |= watch.measure(model)
        figures["suites_s"] = time.perf_counter() - started  # what watching the suites costs (run.json)
        run.log_metrics({k: v for k, v in figures.items() if k.startswith("suite/")}, step=step)
        if figures["broken"]:
            log.info("validation at step %d breaks a suite budget: %s", step, figures["broken"])
    return figures


def tracked_run(cfg: Config, base_cfg: ModelConfig, world: World) -> contextlib.AbstractContextManager[TrainingRun]:
    """The MLflow run, opened by the main process; the others log nowhere."""
    if not world.is_main:
        return contextlib.nullcontext(NOT_TRACKED)
    return pipeline_run(cfg, resolved_revisions(cfg, base_cfg.revision))


def step_hooks(run: TrainingRun, world: World) -> list[StepHook]:
    """After each step: its metrics into MLflow and a log line (main process), and the fault points the
    reliability tests use (every process)."""

    def record(step: int, metrics: dict[str, float]) -> None:
        run.log_step(step, metrics)
        log.info(
            "train step %d: train_loss %.4f, learning_rate %.3g", step, metrics["train_loss"], metrics["learning_rate"]
        )

    return [record, faults.after_step] if world.is_main else [faults.after_step]


def suites_cost(baseline: dict[str, Any], validations: list[dict[str, Any]], history: list[dict[str, float]]) -> dict:
    """Seconds spent scoring the suites (their samples before the first step and at every validation) against
    seconds spent in optimizer steps: what tracking forgetting costs. Empty when no suite was scored."""
    if not baseline:
        return {}
    suites_s = baseline["suites_s"] + sum(v.get("suites_s", 0.0) for v in validations)
    steps_s = sum(
        r["supervised_tokens"] / r["supervised_tokens_per_s"] for r in history if r["supervised_tokens_per_s"]
    )
    return {"suites_seconds": suites_s, "train_steps_seconds": steps_s, "suites_to_steps": suites_s / (steps_s or 1)}


@dataclass(frozen=True)
class Trained:
    """What training left besides the weights: the loop's result and what was measured around it."""

    loop: LoopResult
    val_before: float | None
    trainable_params: int
    encoding: dict[str, dict[str, Any]]  # per split: rows read, kept, dropped (and why)
    suite_baseline: dict[str, Any]  # the suites' figures on their fixed samples before the first step


def export(
    cfg: Config,
    base_cfg: ModelConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    run: TrainingRun,
    trained: Trained,
    held_out: HeldOut,
    world: World,
    meter: cost.CostMeter,
) -> TrainResult:
    """models/: the model and its curves, registered in MLflow, and run.json; the previous models/ stays until the
    new one is complete (a failed export leaves it usable)."""
    result = trained.loop
    with replaced_whole(cfg.paths.model) as out:
        val_after = held_out.nll(model) if held_out else None
        write_loss_curves(out, result.history, result.validations, trained.val_before, val_after, result.steps)
        write_suite_curve(out, trained.suite_baseline, trained.val_before, result.validations)
        selection = selection_of(result.validations, result.best_step, result.steps)
        selection["cost"] = suites_cost(trained.suite_baseline, result.validations, result.history)
        if selection["cost"]:
            run.log_metrics(selection["cost"])
        run.set_tags({"exported_step": str(selection["step"]), "selection": selection["reason"]})
        log.info("exported weights: %s", selection["reason"])
        exported = export_model(out, model, tokenizer, cfg, base_cfg, held_out.nll if held_out else None)
        if exported.merge:
            run.log_metrics({f"merge_{k}": v for k, v in exported.merge.items()})
        # the validation NLL of the weights exported: the run's latest val_nll (the curve's last point, at the last
        # step), and the logged model's
        measured = {"val_nll": val_after} if val_after is not None else {}
        registered = register_model(exported.model_dir, cfg.tracking.registered_model_name, measured, result.steps)
        meter.mark("export")
        figures = meter.figures(model)
        run.log_metrics(cost.metrics(figures))
        report = TrainResult(
            **run.ids,
            **registered,
            steps=result.steps,
            planned_steps=result.planned_steps,
            best_step=result.best_step,
            stopped_early=result.stopped_early,
            resumed_from_step=result.resumed_from_step,
            final_train_loss=result.history[-1]["train_loss"],
            history=result.history,
            validations=result.validations,
            selection=selection,
            suite_baseline=trained.suite_baseline,
            val_nll_before=trained.val_before,
            val_nll_after=val_after,
            merge=exported.merge,
            encoding=trained.encoding,
            trainable_params=trained.trainable_params,
            device=str(world.device),
            processes=world.size,
            cost=figures,
        )
        write_json(out / RUN_FILE, asdict(report))
    return report
