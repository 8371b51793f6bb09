"""Answers a reviewer labels, on the tiny model with a real MLflow SQLite store: the evaluate stage logs one trace per
answered prompt (test split and suite) linked to its evaluation run and the version's logged model; reviewers add
`preference` feedback through MLflow's API as the Traces view does; `sftops review summary` counts it as an
independent count does, and `sftops review export-suite` writes the prompts where tuned lost as a suite that the
suite reader loads and a later evaluation scores, with the labels in its report and the champion's answers beside
the new version's."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import AssessmentSource

from conftest import trained_qa, write_jsonl
from realstack import ROOT, evaluation_runs
from sftops.cli import main
from sftops.config import SuiteConfig, load_config
from sftops.data.store import load_split
from sftops.evaluate.suites import prepare_suite
from sftops.stages.evaluate import run_evaluate
from sftops.tracking.evaluations import TRACES

SCORE = {"tuned": 1.0, "tie": 0.5, "base": 0.0}


def read_table(path: str) -> list[dict[str, str]]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def reviewer(name: str) -> AssessmentSource:
    return AssessmentSource(source_type="HUMAN", source_id=name)


def label(trace_id: str, who: str, value: str, rationale: str | None = None):
    return mlflow.log_feedback(
        trace_id=trace_id, name="preference", value=value, rationale=rationale, source=reviewer(who)
    )


def percentile_interval(scores: list[float], resamples: int, confidence: float) -> tuple[float, float]:
    """An independent bootstrap of the mean (numpy's choice, its own seed)."""
    rng = np.random.default_rng(12345)
    means = rng.choice(np.array(scores), size=(resamples, len(scores)), replace=True).mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def test_reviewers_label_answer_traces_and_the_summary_and_hard_cases_suite_follow(project_folder, tiny_model, capsys):
    suite_rows = [
        {"prompt": f"what is two plus two? ({900 + i})", "completion": "two plus two is four."} for i in range(6)
    ]
    write_jsonl("checks.jsonl", suite_rows)
    suites = [{"name": "checks", "path": "checks.jsonl", "num_generations": 3}]
    evaluate = {"num_generations": 5, "max_new_tokens": 6, "bootstrap_resamples": 4000, "suites": suites}
    cfg, run = trained_qa(tiny_model, evaluate=evaluate)
    run_evaluate(cfg)

    client = MlflowClient(run.tracking_uri)
    [evaluated] = evaluation_runs(client, run.run_id)
    eval_id = evaluated.info.run_id
    mlflow.set_tracking_uri(run.tracking_uri)
    [logged] = mlflow.search_logged_models(
        experiment_ids=[evaluated.info.experiment_id],
        filter_string=f"source_run_id = '{run.run_id}'",
        output_format="list",
    )  # the model the training run logged, which the version was registered from
    model_id = logged.model_id
    tables = {"test": read_table("reports/generations.csv"), "checks": read_table("reports/suites/checks.csv")}
    expected = {(suite, r["id"]): r for suite, rows in tables.items() for r in rows}
    traces = mlflow.search_traces(locations=[evaluated.info.experiment_id], run_id=eval_id, return_type="list")

    # One trace per answered prompt, linked to the evaluation run and the version's logged model.
    assert len(traces) == len(expected) == 5 + 3 == int(evaluated.data.tags[TRACES])
    for trace in traces:
        tags, meta = trace.info.tags, trace.info.trace_metadata
        row = expected[(tags["suite"], tags["row_id"])]
        assert meta["mlflow.sourceRun"] == eval_id and meta["mlflow.modelId"] == model_id
        span = trace.data.spans[0]
        assert span.inputs == {"prompt": row["prompt"], "reference": row["reference"]}
        assert span.outputs == {"base": row["base_output"], "tuned": row["tuned_output"]}
        assert tags["worsened"] == str(float(row["tuned_nll"]) > float(row["base_nll"])).lower()
        assert tags["degenerate"] == (row["tuned_degenerate"] or "no")
        assert tags["source"] == (row["source"] if tags["suite"] == "test" else "checks")
        metrics = span.attributes["metrics"]
        assert metrics["chrf"]["tuned"] == pytest.approx(float(row["tuned_chrf"]))
        assert metrics["nll"]["base"] == pytest.approx(float(row["base_nll"]))

    # Reviewers label as the Traces view does; one edits her label (MLflow keeps the old one, marked invalid).
    by_key = {(t.info.tags["suite"], t.info.tags["row_id"]): t.info.trace_id for t in traces}
    test_ids = [tid for (suite, _), tid in sorted(by_key.items()) if suite == "test"]
    suite_ids = [tid for (suite, _), tid in sorted(by_key.items()) if suite == "checks"]
    label(test_ids[0], "alice", "base", "too short")
    label(test_ids[0], "bob", "base", "wrong number")
    label(test_ids[1], "alice", "tuned")
    label(test_ids[2], "alice", "tie")
    first = label(test_ids[3], "alice", "tuned")
    mlflow.override_feedback(
        trace_id=test_ids[3],
        assessment_id=first.assessment_id,
        value="base",
        rationale="on second look, it loops",
        source=reviewer("alice"),
    )
    label(suite_ids[0], "alice", "base", "lost the answer")
    label(suite_ids[0], "bob", "tie")
    label(suite_ids[1], "bob", "great")  # not a preference value: not counted, the row stays unlabelled
    given = {
        test_ids[0]: ["base", "base"],
        test_ids[1]: ["tuned"],
        test_ids[2]: ["tie"],
        test_ids[3]: ["base"],
        suite_ids[0]: ["base", "tie"],
    }
    scores = {tid: sum(SCORE[v] for v in values) / len(values) for tid, values in given.items()}
    lost = {tid for tid, s in scores.items() if s < 0.5}

    assert main(["review", "summary", f"models:/tiny/{run.version}", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows"], summary["labelled"]) == (len(traces), len(given))
    assert summary["labels"] == {"tuned": 1, "base": 4, "tie": 2} and summary["other_labels"] == 1
    assert summary["win_rate"] == pytest.approx(sum(scores.values()) / len(scores))
    low, high = percentile_interval(list(scores.values()), 4000, 0.95)
    assert summary["win_rate_ci_low"] == pytest.approx(low, abs=0.05)
    assert summary["win_rate_ci_high"] == pytest.approx(high, abs=0.05)
    assert {row["trace_id"] for row in summary["lost"]} == lost
    reasons = {row["trace_id"]: {p["rationale"] for p in row["rationales"]} for row in summary["lost"]}
    assert reasons[test_ids[0]] == {"too short", "wrong number"} and reasons[test_ids[3]] == {
        "on second look, it loops"
    }
    sys.path.insert(0, str(ROOT / "flows"))
    from review_feedback import feedback_markdown  # the Prefect artifact the pipeline flow publishes

    markdown = feedback_markdown(summary)
    assert f"Rows labelled: {len(given)} of {len(traces)}" in markdown and "- [test] " in markdown
    assert main(["review", "summary", "models:/tiny@champion"]) == 2  # no alias yet: one line, no traceback
    assert main(["review", "summary", f"tiny/{run.version}"]) == 0
    assert f"win rate of tuned over base: {summary['win_rate']:.3f}" in capsys.readouterr().out.lower()

    # The prompts where tuned lost become a suite, read by the code evaluate reads suites with.
    assert main(["review", "export-suite", f"models:/tiny/{run.version}", "--name", "hard-cases"]) == 0
    exported = [json.loads(line) for line in Path("data/suites/hard-cases.jsonl").read_text().splitlines()]
    lost_rows = [expected[key] for key, tid in by_key.items() if tid in lost]
    assert sorted((r["prompt"], r["completion"]) for r in exported) == sorted(
        (r["prompt"], r["reference"]) for r in lost_rows
    )
    assert main(["review", "export-suite", f"models:/tiny/{run.version}", "--name", "hard-cases"]) == 2  # exists
    hard = SuiteConfig(name="hard-cases", path="data/suites/hard-cases.jsonl")
    prepared = prepare_suite(hard, load_split(cfg, "train"), cfg.data, cfg.evaluate.sample_seed)
    assert prepared.counts["kept"] == len(lost) and prepared.counts["rejected"] == 0

    # A second version (the same weights, registered again) is evaluated with the first as champion: the new suite is
    # scored like any other, each trace holds the champion's answer where the champion answered that prompt, and the
    # report shows the reviewers' labels so far.
    client.set_registered_model_alias("tiny", "champion", run.version)
    second = client.create_model_version("tiny", client.get_model_version("tiny", run.version).source, run.run_id)
    record = json.loads(Path("models/run.json").read_text())
    Path("models/run.json").write_text(json.dumps({**record, "version": int(second.version)}))
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["evaluate"]["suites"].append({"name": "hard-cases", "path": "data/suites/hard-cases.jsonl"})
    Path("params.yaml").write_text(yaml.safe_dump(params))
    again = run_evaluate(load_config("params.yaml"))
    assert again.metrics["suites"]["hard-cases"]["rows"] == len(lost)
    later = evaluation_runs(client, run.run_id)[-1]
    champion_said = {key: row["tuned_output"] for key, row in expected.items()}
    new = mlflow.search_traces(locations=[later.info.experiment_id], run_id=later.info.run_id, return_type="list")
    assert len(new) == 5 + 3 + len(lost)
    for trace in new:
        key = (trace.info.tags["suite"], trace.info.tags["row_id"])
        assert trace.info.tags["version"] == f"tiny/{second.version}"
        assert trace.data.spans[0].outputs.get("champion") == champion_said.get(key)  # none for the new suite
    html = Path("reports/report.html").read_text()
    assert "<h2>Reviewers' preferences</h2>" in html and f"{summary['win_rate']:.3f}" in html and "too short" in html


def test_evaluations_seeded_alike_log_distinct_traces_and_leave_the_seeded_state_alone(project_folder):
    """Trace ids come from Python's global random, which the stages seed: two evaluation processes seeded alike
    would overwrite each other's traces, and logging must not move the seeded sequence either."""
    import random

    from sftops.tracking.traces import log_answer_traces

    table = {
        "id": ["a", "b"],
        "source": ["qa", "qa"],
        "prompt": ["p1", "p2"],
        "reference": ["r1", "r2"],
        "base_output": ["b1", "b2"],
        "tuned_output": ["t1", "t2"],
        "base_nll": [1.0, 2.0],
        "tuned_nll": [1.5, 1.0],
        "base_degenerate": ["", ""],
        "tuned_degenerate": ["loop", ""],
    }
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    experiment = mlflow.create_experiment("seeded")
    drawn = []
    for _ in range(2):  # as two evaluate processes, each seeded the same way before it logs
        with mlflow.start_run(experiment_id=experiment):
            random.seed(0)
            assert log_answer_traces({"test": table}, "tiny/1", None) == 2
            drawn.append(random.random())
    random.seed(0)
    assert drawn == [random.random()] * 2  # the seeded sequence went on as if nothing had been logged
    traces = mlflow.search_traces(locations=[experiment], return_type="list")
    assert len({t.info.trace_id for t in traces}) == 4
    assert sorted(t.info.tags["worsened"] for t in traces) == ["false", "false", "true", "true"]
    assert sorted(t.info.tags["degenerate"] for t in traces) == ["loop", "loop", "no", "no"]
