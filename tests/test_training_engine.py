"""The train stage's engine features end to end on the tiny model: resume after SIGKILL with identical losses,
atomic checkpoints, a clear stop on a non-finite loss, early stopping that exports the best weights, per-step
tracking that can be audited, merging, DoRA, QLoRA refusal on CPU, and torchrun when num_processes > 1."""

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from conftest import sftops
from sftops.config import load_config
from sftops.data.examples import encode_curated_rows
from sftops.data.store import load_split
from sftops.errors import TrainingError
from sftops.modeling import load_finetuned
from sftops.stages.train import TrainResult, run_train
from sftops.train import checkpoint
from sftops.train.checkpoint import checkpoint_folder
from sftops.train.loss import mean_nll, score_rows


def losses(run: dict | TrainResult) -> list[float]:
    """The training loss per step, of run.json or of the stage's result."""
    history = run["history"] if isinstance(run, dict) else run.history
    return [h["train_loss"] for h in history]


@pytest.mark.reliability
def test_resume_after_kill_matches_an_uninterrupted_run(project, figures):
    _, write = project
    # LoRA with dropout: the resumed run must also restore the RNG, the optimizer and the data position.
    write({"method": "lora", "max_steps": 8, "checkpoint_every": 2, "keep_checkpoints": 2})
    cfg = load_config("params.yaml")
    folder = checkpoint_folder(cfg)
    uninterrupted = run_train(cfg)  # the reference, in this process; the runs below are killed as a process is
    assert not folder.exists()  # a finished job leaves no checkpoints behind

    killed = sftops("train", fault="after_step:5")
    assert killed.returncode == -9
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002", "step-000004"]
    # Killed again, in the middle of writing the next checkpoint: the half-written one is never picked up.
    killed = sftops("train", fault="checkpoint_write:step-000006")
    assert killed.returncode == -9
    assert [p.name for p in folder.glob(".step-000006.tmp")] == [".step-000006.tmp"]
    assert checkpoint.latest(folder).name == "step-000004"

    resumed = sftops("train")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads(Path("models/run.json").read_text())
    assert report["resumed_from_step"] == 4
    assert losses(report) == pytest.approx(losses(uninterrupted), rel=1e-6)
    assert report["final_train_loss"] == pytest.approx(uninterrupted.final_train_loss, rel=1e-6)
    figures["faults injected"] += 2  # SIGKILL after a step, SIGKILL in the middle of a checkpoint write
    figures["faults survived"] += 2
    figures["runs resumed with matching losses"] += 1


@pytest.mark.reliability
def test_a_corrupt_checkpoint_is_never_loaded(project, figures):
    _, write = project
    write({"method": "lora", "max_steps": 6, "checkpoint_every": 2})
    folder = checkpoint_folder(load_config("params.yaml"))
    assert sftops("train", fault="after_step:5").returncode == -9
    newest = folder / "step-000004"
    weights = newest / checkpoint.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert not checkpoint.is_valid(newest)
    assert checkpoint.latest(folder).name == "step-000002"
    figures["faults injected"] += 2  # SIGKILL, then a flipped byte in the newest checkpoint
    figures["faults survived"] += 2


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(project):
    _, write = project
    write({"method": "full", "max_steps": 30, "learning_rate": 1e12, "max_grad_norm": 1e12, "checkpoint_every": 1})
    cfg = load_config("params.yaml")
    with pytest.raises(TrainingError, match=r"step (\d+): non-finite .* the last good checkpoint is") as err:
        run_train(cfg)
    last = checkpoint.latest(checkpoint_folder(cfg))
    assert last is not None and str(last) in str(err.value)
    assert checkpoint.is_valid(last)


def test_early_stopping_exports_the_best_validated_weights(project):
    _, write = project
    write(
        {
            "method": "full",
            "max_steps": 40,
            "learning_rate": 0.05,
            "grad_accum_steps": 1,
            "eval_every": 2,
            "early_stopping_patience": 2,
        }
    )
    cfg = load_config("params.yaml")
    report = run_train(cfg)
    vals = report.validations
    best = min(vals, key=lambda v: v["val_nll"])
    assert report.best_step == best["step"]
    assert report.val_nll_after == pytest.approx(best["val_nll"], rel=1e-5)
    # This setting overfits the tiny data: validation turns up, and two evaluations without improvement stop it.
    assert report.stopped_early and report.steps < report.planned_steps
    assert [v["step"] for v in vals if v["step"] > best["step"]] == [best["step"] + 2, best["step"] + 4]


def test_step_metrics_audit_the_normalisation_and_split_by_source(project):
    _, write = project
    write({"method": "lora", "max_steps": 3, "grad_accum_steps": 2})
    report = run_train(load_config("params.yaml"))
    client = MlflowClient(report.tracking_uri)
    metrics = client.get_run(report.run_id).data.metrics
    for name in (
        "train_loss",
        "response_nll_sum",
        "supervised_tokens",
        "token_accuracy",
        "learning_rate",
        "grad_norm",
        "supervised_tokens_per_s",
        "cumulative_supervised_tokens",
        "train_loss/maths",
        "train_loss/chat",
    ):
        assert name in metrics, name
    for h in report.history:
        assert h["train_loss"] == pytest.approx(h["response_nll_sum"] / h["supervised_tokens"])
    assert report.history[-1]["cumulative_supervised_tokens"] == sum(h["supervised_tokens"] for h in report.history)
    # The two sources' losses average, weighted by their tokens, to the step's loss: nothing is counted twice.
    history = client.get_metric_history(report.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3]


def test_merged_adapter_has_the_adapter_models_held_out_loss(project):
    _, write = project
    write({"method": "lora", "max_steps": 4, "merge_adapter": True})
    cfg = load_config("params.yaml")
    report = run_train(cfg)
    assert report.merge["relative_drift"] <= 1e-5
    assert (Path("models/model/model.safetensors")).exists() and not Path("models/model/adapter_config.json").exists()
    merged, tok = load_finetuned("models/model")
    val, _, _ = encode_curated_rows(tok, load_split(cfg, "val"), cfg.model.max_length)
    merged_nll = mean_nll(score_rows(merged, val, 8, tok.pad_token_id, torch.device("cpu")))
    assert merged_nll == pytest.approx(report.merge["adapter_nll"], rel=1e-5)
    assert report.merge["adapter_nll"] == pytest.approx(report.val_nll_after, rel=1e-6)


def test_dora_trains_and_loads_back(project):
    _, write = project
    write({"method": "dora", "max_steps": 3})
    report = run_train(load_config("params.yaml"))
    assert json.loads(Path("models/model/adapter_config.json").read_text())["use_dora"] is True
    model, _ = load_finetuned("models/model")
    assert report.val_nll_after < report.val_nll_before
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_qlora_without_a_gpu_is_refused_with_the_fix(project):
    done = sftops("train", "--set", "train.method=qlora")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "train.method=qlora needs a CUDA GPU" in done.stderr and "use train.method=lora" in done.stderr


def test_ddp_and_fsdp_processes_through_the_train_stage_match_one(project):
    """num_processes=2 makes the stage launch torchrun (gloo on CPU): 2 x micro-batch 4 takes the same steps as
    1 x micro-batch 8, with replicas (ddp) and with parameters, gradients and optimizer state sharded (fsdp),
    whose exported model is gathered whole."""
    _, write = project
    common = {"method": "full", "max_steps": 3, "group_by_length": False}
    write({**common, "micro_batch_size": 8})
    one = run_train(load_config("params.yaml"))
    for distributed in ("ddp", "fsdp"):
        write({**common, "micro_batch_size": 4, "num_processes": 2, "distributed": distributed})
        two = run_train(load_config("params.yaml"))
        assert two.processes == 2
        assert losses(two) == pytest.approx(losses(one), rel=1e-5), distributed
        assert two.val_nll_after == pytest.approx(one.val_nll_after, rel=1e-4), distributed


def test_fsdp_resume_after_kill_matches_an_uninterrupted_run(project):
    """With sharded training the checkpoint holds the whole weights and optimizer state (gathered), and a
    killed 2-process FSDP job resumes to the same losses as one uninterrupted process."""
    _, write = project
    common = {"method": "full", "max_steps": 5, "group_by_length": False, "checkpoint_every": 2}
    write({**common, "micro_batch_size": 8})
    reference = run_train(load_config("params.yaml"))
    write({**common, "micro_batch_size": 4, "num_processes": 2, "distributed": "fsdp"})
    folder = checkpoint_folder(load_config("params.yaml"))
    assert sftops("train", fault="after_step:3").returncode != 0
    assert checkpoint.latest(folder).name == "step-000002"
    resumed = sftops("train")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads(Path("models/run.json").read_text())
    assert report["resumed_from_step"] == 2 and report["processes"] == 2
    assert losses(report) == pytest.approx(losses(reference), rel=1e-5)
