"""Regression suites on real data and a real pre-trained model (../shared): stories260K fine-tuned on GSM8K,
reviewed on the self-instruct seed tasks as a general suite, and the reverse. The whole evaluate stage runs
(MLflow SQLite store, registry, report); the figures are printed for the README (pytest -s)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import SHARED, formatted, write_project
from realstack import evaluation_runs
from sftops.config import Config
from sftops.evaluate.promotion import LENGTH_RATIO, with_budget
from sftops.stages.evaluate import run_evaluate
from sftops.stages.train import TrainResult, run_train
from sftops.tracking import registry

SELF_INSTRUCT = SHARED / "data" / "self-instruct-seed" / "seed_tasks.jsonl"
# The seed tasks' first instance as the alpaca instruction/input/output.
SELF_INSTRUCT_SOURCE = {
    "path": str(SELF_INSTRUCT),
    "schema": "alpaca",
    "fields": {"input": "instances[0].input", "output": "instances[0].output"},
}


@pytest.fixture
def project(project_folder, stories_model, gsm8k):
    """A function: (source, train steps, suite) -> a config whose data has been ingested and formatted."""
    if not SELF_INSTRUCT.exists():
        pytest.skip(f"self-instruct seed tasks not found at {SELF_INSTRUCT} (../shared is absent)")

    def make(source: dict, steps: int, suite: dict) -> Config:
        return formatted(
            write_project(
                stories_model,
                [source],
                data={"test_fraction": 0.15, "val_fraction": 0.05},
                model={"max_length": 320},
                train={
                    "method": "full",
                    "max_steps": steps,
                    "micro_batch_size": 8,
                    "learning_rate": 0.004,
                    "warmup_ratio": 0.1,
                },
                evaluate={
                    "num_generations": 4,
                    "max_new_tokens": 24,
                    "bootstrap_resamples": 1000,
                    "suites": [{"num_generations": 8, **suite}],
                },
                tracking={"registered_model_name": "stories"},
            )
        )

    return make


def promote(run: TrainResult, metrics: dict, cfg: Config) -> dict:
    """The pipeline flow's record and promote steps, as the flow calls them once the run is in git and DVC (with
    the run's record, run.json)."""
    record = asdict(run)
    registry.record_version(record, {registry.VERSIONED: "true", registry.VERSIONED_REASON: "recorded by the test"})
    return registry.promote(record, metrics, cfg.evaluate.primary_metric, cfg.evaluate.promotion_margin).as_dict()


def figures(name: str, m: dict) -> str:
    v = m["suites"][name]
    return (
        f"test NLL {m['base']['nll']:.3f} -> {m['tuned']['nll']:.3f}; suite {name} ({v['rows']} rows): NLL "
        f"{v['base']['nll']:.3f} -> {v['tuned']['nll']:.3f}, "
        f"change CI [{v['delta_ci_low']:+.3f}, {v['delta_ci_high']:+.3f}], "
        f"win rate {v['win_rate']:.2f}, chrF {v['base']['chrf']:.2f} -> {v['tuned']['chrf']:.2f}, words "
        f"{v['base']['response_words_mean']:.1f} -> {v['tuned']['response_words_mean']:.1f}, stop rate "
        f"{v['base']['stopped_rate']:.2f} -> {v['tuned']['stopped_rate']:.2f}, length ratio "
        f"{v['behaviour']['length_ratio']:.3f} [{v['behaviour']['length_ratio_ci_low']:.3f}, "
        f"{v['behaviour']['length_ratio_ci_high']:.3f}], degenerate {v['behaviour']['degenerate_rate_base']:.2f} -> "
        f"{v['behaviour']['degenerate_rate_tuned']:.2f}; {m['promotion']['alias']}"
    )


def test_a_gsm8k_fine_tune_that_got_worse_on_general_instructions_is_refused_champion(project, gsm8k, tmp_path):
    cfg = project(
        {"name": "gsm8k", "path": str(gsm8k / "train.jsonl"), "max_rows": 240},
        100,
        {"name": "general", **SELF_INSTRUCT_SOURCE},
    )
    run = run_train(cfg)
    m = run_evaluate(cfg).metrics
    m["promotion"] = promote(run, m, cfg)
    print("\nGSM8K fine-tune, self-instruct suite:", figures("general", m))
    general = m["suites"]["general"]
    assert m["nll_improvement_ci_low"] > 0  # the test split alone says: a clear win
    assert general["regressed"] and general["delta_ci_low"] > 0 and not general["informational"]
    assert general["read"] == 175 and general["rows"] + general["dropped_tokens"] == 175 and general["generations"] == 8
    assert m["promotion"]["alias"] == "challenger" and m["promotion"]["regressed_suites"] == ("general",)
    assert (
        f"suite 'general' nll {general['base']['nll']:.4f} (base) -> {general['tuned']['nll']:.4f} (tuned)"
        in m["promotion"]["reason"]
    )
    client = MlflowClient(run.tracking_uri)
    with pytest.raises(Exception, match="alias"):
        client.get_model_version_by_alias("stories", "champion")

    on_disk = json.loads(Path("metrics.json").read_text())
    assert on_disk["suites"]["general"]["delta_ci_low"] == general["delta_ci_low"]
    with open("reports/suites/general.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 8 and {"prompt", "base_output", "tuned_output", "base_nll", "tuned_nll"} <= set(table[0])
    html = Path("reports/report.html").read_text()
    assert "Regression suites" in html and "general: rows that got most worse" in html and "REGRESSED" in html
    logged = evaluation_runs(client, run.run_id)[-1]
    assert logged.data.metrics["suite/general/tuned_nll"] == pytest.approx(general["tuned"]["nll"])
    assert logged.data.metrics["suite/general/regressed"] == 1.0
    inputs = {d.dataset.name: d for d in logged.inputs.dataset_inputs}
    assert inputs["suite/general"].dataset.digest == general["sha256"][:32]
    assert [t.value for t in inputs["suite/general"].tags if t.key == "mlflow.data.context"] == ["evaluation"]

    # The base model's suite results are cached; marked informational, the suite reports but no longer blocks.
    informational = cfg.model_copy(deep=True)
    informational.evaluate.suites[0].informational = True
    result = run_evaluate(informational)
    again = {**result.metrics, "promotion": promote(run, result.metrics, informational)}
    assert result.suites_base_eval_cached == {"general": True} and again["suites"]["general"]["base"] == general["base"]
    assert again["promotion"]["alias"] == "champion"
    assert "informational suite general regressed (not blocking)" in again["promotion"]["reason"]


def test_a_self_instruct_fine_tune_whose_gsm8k_nll_fell_but_whose_answers_shrank_is_refused_for_that(project, gsm8k):
    cfg = project(
        {"name": "selfinstruct", **SELF_INSTRUCT_SOURCE},
        30,
        {"name": "math", "path": str(gsm8k / "test.jsonl"), "max_rows": 80},
    )
    run = run_train(cfg)
    m = run_evaluate(cfg).metrics
    m["promotion"] = promote(run, m, cfg)
    print("\nself-instruct fine-tune, GSM8K suite:", figures("math", m))
    print("reason:", m["promotion"]["reason"])
    math = m["suites"]["math"]
    assert not math["regressed"] and math["delta_ci_high"] < 0  # its NLL fell, with the whole interval
    assert math["sampled_out"] == 1319 - 80 and math["train_duplicates"] == 0
    # ... but its answers to GSM8K shrank well below half the base model's words, and most collapsed (empty or
    # looping) where the base's only ran into the token limit: the suite's budget refuses it, with the figures.
    behaviour = math["behaviour"]
    assert behaviour["broken"] == ["length_ratio", "collapsed_rise"] and behaviour["length_ratio_ci_high"] < 0.5
    assert behaviour["degenerate_rate_base"] == 1.0 and "degenerate_rise" not in behaviour["broken"]
    assert m["promotion"]["alias"] == "challenger" and m["promotion"]["regressed_suites"] == ()
    assert m["promotion"]["broken_budgets"] == ("suite 'math' length_ratio", "suite 'math' collapsed_rise")
    assert f"suite 'math' length_ratio {behaviour['length_ratio']:.4f} (mean words" in m["promotion"]["reason"]

    # The same figures held to no budget (a floor of 0, a ceiling of 1), as the evaluate stage applies a suite's
    # budget: champion.
    math["behaviour"] = with_budget(behaviour, LENGTH_RATIO, 0.0, 1.0, "suite 'math'")
    again = promote(run, m, cfg)
    assert math["behaviour"]["broken"] == []
    assert again["alias"] == "champion" and "no regression on 1 suite" in again["reason"]


def test_training_exports_the_best_step_within_the_suites_budget_when_later_steps_break_it(project, gsm8k):
    """The same fine-tune, validated every 5 steps with the GSM8K suite scored on a fixed sample: the steps whose
    answers there shrank below the floor or collapsed are passed over, and the export is the best validation within
    budget, an earlier step than the last; the evaluate stage, on the exported weights, finds the figures that
    step had during training and passes the suite's budget."""
    cfg = project(
        {"name": "selfinstruct", **SELF_INSTRUCT_SOURCE},
        30,
        {"name": "math", "path": str(gsm8k / "test.jsonl"), "max_rows": 80},
    )
    cfg.train.eval_every, cfg.train.suite_rows, cfg.train.suite_generations = 5, 32, 8
    run = run_train(cfg)
    print("\nvalidations (step, val NLL, math length ratio, collapsed share, budget broken):")
    for v in run.validations:
        ratio, collapsed = v["suite/math/length_ratio"], v["suite/math/collapsed_rate"]
        print(f"  {v['step']:>2} {v['val_nll']:.4f} {ratio:.3f} {collapsed:.3f} {v['broken'] or '-'}")
    print("selection:", run.selection["reason"])
    within = [v for v in run.validations if not v["broken"]]
    assert within and len(within) < len(run.validations)  # some steps broke the budget, some did not
    chosen = min(within, key=lambda v: v["val_nll"])
    assert run.selection == {**run.selection, "step": chosen["step"], "within_budget": True}
    assert run.best_step == chosen["step"] < run.steps == 30
    assert any(v["broken"] and v["step"] > chosen["step"] for v in run.validations)
    assert run.val_nll_after == pytest.approx(chosen["val_nll"], abs=1e-4)  # the exported weights are that step's

    m = run_evaluate(cfg).metrics
    behaviour = m["suites"]["math"]["behaviour"]
    # The evaluation's 8 sampled prompts are the training sample's 8 (one seeded ranking): the same figures.
    assert behaviour["length_ratio"] == pytest.approx(chosen["suite/math/length_ratio"], abs=1e-6)
    assert behaviour["broken"] == [] and m["selection"] == run.selection
    m["promotion"] = promote(run, m, cfg)
    assert m["promotion"]["alias"] == "champion", m["promotion"]["reason"]
