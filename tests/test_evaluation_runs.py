"""Evaluations per model and per dataset, on the tiny model with a real MLflow SQLite store: each evaluation is
its own run linked to the registered version's logged model and to the test split (name and digest); the
promotion gate compares on the same digest and only the settings the primary metric depends on, and measures a
champion on a test split it has no result for; the version's description says what a reviewer needs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from conftest import QA, formatted, qa_rows, write_jsonl, write_project
from realstack import evaluation_runs
from sftops.config import Config
from sftops.data.examples import training_examples
from sftops.data.store import load_split
from sftops.encoded import IGNORE
from sftops.evaluate.champion import measurer
from sftops.evaluate.identity import comparable_settings
from sftops.modeling import load_finetuned
from sftops.stages.evaluate import run_evaluate
from sftops.stages.format import run_format
from sftops.stages.train import TrainResult, run_train
from sftops.tracking import evaluations, models, registry

GOOD = {"method": "full", "max_steps": 20, "micro_batch_size": 8, "learning_rate": 0.01}
BAD = {"method": "full", "max_steps": 1, "micro_batch_size": 8, "learning_rate": 0.0001}
# The barely trained BAD model answers random bytes as its random-init base does, a fifth of a reference's words,
# which the test split's length budget rightly refuses; these tests are about the NLL gate, so it is off for BAD.
BUDGET_OFF = {"test_min_length_ratio": None}


@pytest.fixture
def workdir(project_folder, tiny_model):
    """A source in tmp_path, ingested and formatted once; returns a function: (train, evaluate, data) params ->
    config."""
    sources = [{"name": "qa", "path": str(write_jsonl("qa.jsonl", qa_rows(80, QA[:1])))}]

    def make(train: dict, evaluate: dict | None = None, data: dict | None = None) -> Config:
        evaluate = {"num_generations": 4, "max_new_tokens": 4, "bootstrap_resamples": 200, **(evaluate or {})}
        data = {"test_fraction": 0.25, **(data or {})}
        return formatted(write_project(tiny_model, sources, train=train, evaluate=evaluate, data=data))

    return make


def recorded(run: TrainResult) -> dict:
    """What the pipeline flow's record step writes on the version once the run is in git and DVC; returns the run's
    record (run.json), as the flow hands it to the promote step."""
    record = asdict(run)
    registry.record_version(
        record,
        {
            registry.VERSIONED: "true",
            registry.VERSIONED_REASON: "refs/exps/x pushed by the test",
            "dvc.experiment": f"exp-v{run.version}",
            "git.ref": "refs/exps/ab/x",
            "git.commit": "c0ffee" * 6,
            "dvc.curated_md5": "feed" * 8 + ".dir",
        },
    )
    return record


def digest_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:32]


def test_nll_settings_leave_out_what_only_generations_depend_on():
    def settings(tokenizer: str = "tokenizer-sha", max_length: int = 64, **evaluate) -> dict:
        cfg = Config.model_validate(
            {
                "data": {"sources": [{"name": "qa", "path": "qa.jsonl"}]},
                "model": {"base": "x", "max_length": max_length},
                "evaluate": evaluate,
            }
        )
        return comparable_settings(cfg, tokenizer)

    base = settings()
    for change in ({"num_generations": 4}, {"max_new_tokens": 8}, {"do_sample": True}, {"answer_extraction": "gsm8k"}):
        other = settings(**change)
        assert other["nll"] == base["nll"] and other["generation"] != base["generation"], change
    assert settings(batch_size=2)["nll"] == base["nll"]  # NLL is per row: padding is masked
    assert settings(max_length=32)["nll"] != base["nll"] and settings("another")["nll"] != base["nll"]


def test_a_second_evaluation_adds_a_linked_run_and_leaves_earlier_numbers_unchanged(workdir):
    cfg = workdir(GOOD, {"num_generations": 4})
    run = run_train(cfg)
    client = MlflowClient(run.tracking_uri)
    training_metrics = client.get_run(run.run_id).data.metrics
    first = run_evaluate(cfg).metrics
    [one] = evaluation_runs(client, run.run_id)
    before = dict(one.data.metrics)
    second = run_evaluate(workdir(GOOD, {"num_generations": 2})).metrics  # `dvc exp run -S evaluate.num_generations=2`
    one_after, two = evaluation_runs(client, run.run_id)
    assert one_after.info.run_id == one.info.run_id and one_after.data.metrics == before
    training = client.get_run(run.run_id)
    assert training.data.metrics == training_metrics  # no test numbers in the training run
    assert training.data.tags[evaluations.LATEST] == two.info.run_id  # and from it, the way to its latest evaluation
    assert two.data.metrics["test_tuned_nll"] == pytest.approx(second["tuned"]["nll"])
    assert two.data.params["test_generations"] == "2" and one.data.params["test_generations"] == "4"

    model_id = evaluations.model_id(client, "tiny", run.version)
    digest = digest_of(Path("data/curated/test.parquet"))
    for evaluated in (one_after, two):
        assert evaluated.data.tags["mlflow.parentRunId"] == run.run_id
        assert [m.model_id for m in evaluated.inputs.model_inputs] == [model_id]
        [test] = [d for d in evaluated.inputs.dataset_inputs if d.dataset.name == "test"]
        assert test.dataset.digest == digest and [t.value for t in test.tags if t.key == "mlflow.data.context"] == [
            "evaluation"
        ]
    linked = [m for m in client.get_logged_model(model_id).metrics if m.key == "test_tuned_nll"]
    assert {m.run_id for m in linked} == {one.info.run_id, two.info.run_id}
    assert {m.dataset_digest for m in linked} == {digest} and {m.dataset_name for m in linked} == {"test"}
    # NLL does not depend on how many answers are generated: same value, same comparison key; generation keys differ.
    assert first["tuned"]["nll"] == pytest.approx(second["tuned"]["nll"])
    assert one.data.params["comparison_key.nll"] == two.data.params["comparison_key.nll"]
    assert one.data.params["comparison_key.generation"] != two.data.params["comparison_key.generation"]
    # The test split travels with the first evaluation, so the champion can be measured on it from anywhere.
    copy = Path(mlflow.artifacts.download_artifacts(run_id=one.info.run_id, artifact_path="eval/data/test.parquet"))
    assert digest_of(copy) == digest


def test_the_gate_compares_nll_with_a_champion_measured_with_other_generation_settings(workdir):
    """The reported case: champion measured with 16 generations, challenger with 4, same curated data."""
    weak_cfg = workdir(BAD, {"num_generations": 16, **BUDGET_OFF})
    weak = run_train(weak_cfg)
    run_evaluate(weak_cfg)
    assert (
        registry.promote(recorded(weak), json.loads(Path("metrics.json").read_text()), "nll", 0.0).alias == "champion"
    )
    client = MlflowClient(weak.tracking_uri)
    [champion_eval] = evaluation_runs(client, weak.run_id)

    cfg = workdir(GOOD, {"num_generations": 4})
    strong = run_train(cfg)
    metrics = run_evaluate(cfg).metrics
    decision = registry.promote(recorded(strong), metrics, "nll", 0.0, measurer(cfg))
    assert decision.alias == "champion" and "beats it by more than the margin" in decision.reason
    assert decision.champion_version == weak.version
    assert decision.champion_value == pytest.approx(champion_eval.data.metrics["test_tuned_nll"])
    assert len(evaluation_runs(client, weak.run_id)) == 1  # its result was comparable: not measured again


def independent_nll(model_dir: Path, cfg: Config) -> float:
    """Response NLL of a model on the test split, one row at a time with plain torch (no batching, no padding)."""
    model, tokenizer = load_finetuned(model_dir)
    model.eval()
    examples, _, _ = training_examples(cfg, tokenizer, "test", load_split(cfg, "test"))
    total, tokens = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(torch.tensor([e.input_ids])).logits[0, :-1]
            targets = torch.tensor(e.labels[1:])
            keep = targets != IGNORE
            total += float(torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="sum"))
            tokens += int(keep.sum())
    return total / tokens


def test_a_champion_without_a_result_on_the_new_test_set_is_measured_there_and_the_version_is_described(workdir):
    first_cfg = workdir(BAD, BUDGET_OFF)
    weak = run_train(first_cfg)
    run_evaluate(first_cfg)
    assert (
        registry.promote(recorded(weak), json.loads(Path("metrics.json").read_text()), "nll", 0.0).alias == "champion"
    )
    client = MlflowClient(weak.tracking_uri)
    old_digest = digest_of(Path("data/curated/test.parquet"))

    cfg = workdir(GOOD, data={"split_seed": 1})  # another split: another test set
    run_format(cfg)
    new_digest = digest_of(Path("data/curated/test.parquet"))
    assert new_digest != old_digest
    strong = run_train(cfg)
    metrics = run_evaluate(cfg).metrics
    record = recorded(strong)
    refused = registry.promote(record, metrics, "nll", 0.0)  # without a way to measure the champion: no comparison
    assert refused.alias == "challenger" and "no nll result on this test set" in refused.reason

    decision = registry.promote(record, metrics, "nll", 0.0, measurer(cfg))
    first, measured = evaluation_runs(client, weak.run_id)
    assert [d.dataset.digest for d in first.inputs.dataset_inputs] == [old_digest]
    assert [d.dataset.digest for d in measured.inputs.dataset_inputs] == [new_digest]
    assert [m.model_id for m in measured.inputs.model_inputs] == [evaluations.model_id(client, "tiny", weak.version)]
    assert measured.data.tags["mlflow.parentRunId"] == weak.run_id
    mlflow.set_tracking_uri(weak.tracking_uri)
    expected = independent_nll(models.local_model_dir(f"models:/tiny/{weak.version}"), cfg)
    assert measured.data.metrics["test_tuned_nll"] == pytest.approx(expected, rel=1e-4)
    assert decision.champion_value == pytest.approx(expected, rel=1e-4)
    assert decision.alias == "champion" and "beats it by more than the margin" in decision.reason

    description = client.get_model_version("tiny", strong.version).description
    [evaluated] = evaluation_runs(client, strong.run_id)
    report = f"runs:/{evaluated.info.run_id}/eval/report.html"
    level = round(100 * metrics["confidence"])
    for part in (
        str(cfg.model.base),
        "**Method**: full",
        f"exp-v{strong.version}",
        "c0ffee" * 6,
        "feed" * 8 + ".dir",
        f"{level}% CI [{metrics['nll_improvement_ci_low']:+.4f}, {metrics['nll_improvement_ci_high']:+.4f}]",
        new_digest,
        "**Promotion gate**: champion",
        decision.reason,
        report,
    ):
        assert part in description, part
    html = Path(mlflow.artifacts.download_artifacts(report)).read_text()
    assert f"{metrics['nll_improvement_ci_low']:+.4f}" in html
