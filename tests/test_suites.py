"""Regression suites, the parts that need no model: the gate's verdict (the whole interval beyond the margin,
informational suites never blocking, the refusing suite named with its figures), the paired intervals, and a
suite's rows checked against the train split. And through the CLI: a missing or empty suite stops evaluate
with one line naming it. On the tiny model: metrics.json, MLflow and the report carry the behaviour of the test
split and of a suite, as recomputed from the generations tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import arithmetic_rows, error_lines, formatted, write_jsonl, write_project
from realstack import evaluation_runs
from sftops.cli import main
from sftops.config import Config, DataConfig, SuiteConfig
from sftops.evaluate.comparison import mean_delta_ci, perplexity_delta_ci
from sftops.evaluate.promotion import CHALLENGER, CHAMPION, Champion, SuiteResult, decide
from sftops.evaluate.suites import generation_sample, prepare_suite, suite_budget, suite_margin, suite_metric
from sftops.stages.evaluate import run_evaluate
from sftops.stages.train import run_train


def suite_result(
    low: float, high: float, metric: str = "nll", margin: float = 0.0, informational: bool = False
) -> SuiteResult:
    return SuiteResult("general", metric, 2.0, 2.0 + (low + high) / 2, low, high, margin, informational)


def test_a_suite_regresses_only_when_the_whole_interval_lies_beyond_the_margin_on_the_worse_side():
    assert suite_result(0.1, 0.3).regressed  # NLL rose, the whole CI above 0
    assert not suite_result(-0.1, 0.3).regressed  # the CI spans 0: noise, not a regression
    assert not suite_result(0.1, 0.3, margin=0.2).regressed  # part of the CI within the margin
    assert suite_result(0.25, 0.3, margin=0.2).regressed
    assert not suite_result(-0.3, -0.1).regressed  # NLL fell: better
    assert suite_result(-8.0, -2.0, metric="chrf").regressed  # higher is better: chrF fell
    assert not suite_result(-8.0, -2.0, metric="chrf", margin=3.0).regressed
    assert not suite_result(2.0, 8.0, metric="chrf").regressed


def test_a_model_that_does_not_beat_its_base_on_the_test_split_is_never_champion():
    refused = decide(
        "nll", 2.1, "eval-id", "1", None, 0.0, base_value=2.0
    )  # worse than the base: no champion yet or not
    assert refused.alias == CHALLENGER and "does not beat the base model's 2.0000" in refused.reason
    assert decide("nll", 1.9, "eval-id", "1", None, 0.0, base_value=2.0).alias == CHAMPION
    assert decide("chrf", 30.0, "eval-id", "1", None, 0.0, base_value=31.0).alias == CHALLENGER  # higher is better


def test_a_suite_regression_keeps_a_better_model_from_champion_and_the_decision_names_the_suite_and_figures():
    args = ("nll", 1.5, "eval-id", "3", Champion("2", 1.8, "eval-id"), 0.0)
    assert decide(*args).alias == CHAMPION  # beats the champion on the test split
    refused = decide(*args, suites=[suite_result(0.1, 0.3), SuiteResult("math", "nll", 1.0, 0.9, -0.2, 0.0, 0.0)])
    assert refused.alias == CHALLENGER and refused.regressed_suites == ("general",)
    assert "suite 'general' nll 2.0000 (base) -> 2.2000 (tuned)" in refused.reason
    assert "[+0.1000, +0.3000]" in refused.reason and "margin 0.0" in refused.reason and "math" not in refused.reason
    # With no champion yet, a regression still blocks.
    assert decide("nll", 1.5, "eval-id", "1", None, 0.0, suites=[suite_result(0.1, 0.3)]).alias == CHALLENGER
    passed = decide(*args, suites=[suite_result(-0.1, 0.3)])
    assert passed.alias == CHAMPION and "no regression on 1 suite" in passed.reason


def test_an_informational_suite_is_reported_but_never_blocks():
    noted = decide("nll", 1.5, "eval-id", "1", None, 0.0, suites=[suite_result(0.1, 0.3, informational=True)])
    assert noted.alias == CHAMPION and noted.regressed_suites == ()
    assert "informational suite general regressed (not blocking)" in noted.reason


def test_paired_intervals_of_the_change_contain_the_change_and_follow_its_sign():
    base, tuned = [10.0, 20.0, 30.0, 40.0] * 5, [5.0, 12.0, 25.0, 30.0] * 5
    delta, low, high = mean_delta_ci(base, tuned, 500, 0, 0.95)
    assert delta == pytest.approx(-7.0) and low <= delta <= high < 0
    scores_base, scores_tuned = [(20.0, 10), (30.0, 10)] * 8, [(25.0, 10), (33.0, 10)] * 8
    delta, low, high = perplexity_delta_ci(scores_base, scores_tuned, 500, 0, 0.95)
    import math

    assert delta == pytest.approx(math.exp(2.9) - math.exp(2.5)) and 0 < low <= delta <= high


def conversation(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def test_suite_rows_duplicating_train_rows_are_excluded_and_counted_and_overlapping_prompts_reported(tmp_path):
    train = [
        {"id": str(i), **conversation(f"tell me a story about a {animal} in the big old forest", "once upon a time")}
        for i, animal in enumerate(("cat", "dog"))
    ]
    suite_file = write_jsonl(
        tmp_path / "suite.jsonl",
        [
            {
                "prompt": "tell me a story about a cat in the big old forest",
                "completion": "once upon a time",
            },  # a train row
            {
                "prompt": "tell me a story about a cat in the big old forest",
                "completion": "a different answer",
            },  # overlap
            {"prompt": "what is the capital of france?", "completion": "paris"},
            {"prompt": "what is the capital of france?", "completion": "paris"},  # a duplicate within the suite
            {"prompt": "", "completion": "no prompt"},  # invalid: rejected
        ],
    )
    data = DataConfig(sources=[{"name": "x", "path": "x.jsonl"}], contamination_ngram=3, contamination_threshold=0.5)
    prepared = prepare_suite(SuiteConfig(name="general", path=str(suite_file)), train, data, seed=0)
    assert prepared.counts == {
        "read": 5,
        "rejected": 1,
        "duplicates": 1,
        "train_duplicates": 1,
        "sampled_out": 0,
        "kept": 2,
    }
    assert [r["messages"][-1]["content"] for r in prepared.rows] == ["a different answer", "paris"]
    assert [c["origin"] for c in prepared.contaminated] == [prepared.rows[0]["origin"]]
    assert prepared.contaminated[0]["overlap"] == 1.0
    capped = prepare_suite(SuiteConfig(name="general", path=str(suite_file), max_rows=1), train, data, seed=0)
    assert capped.counts["sampled_out"] == 1 and capped.counts["kept"] == 1


def test_the_generation_sample_is_seeded_distinct_and_stable_when_rows_are_added():
    rows = [{"id": f"{i:03d}", **conversation(f"question {i}", f"answer {i}")} for i in range(40)]
    first, refs = generation_sample(rows, 8, seed=0)
    assert len({r["id"] for r in first}) == 8 and all(len(r) == 1 for r in refs)
    assert generation_sample(rows, 8, seed=0)[0] == first and generation_sample(rows, 8, seed=1)[0] != first
    grown = rows + [{"id": f"x{i:03d}", **conversation(f"new question {i}", "a")} for i in range(40)]
    # A row of the old suite in the new sample was already in the old sample (it only gained competitors).
    old_ids = {r["id"] for r in rows}
    assert {r["id"] for r in generation_sample(grown, 8, seed=0)[0]} & old_ids <= {r["id"] for r in first}


def test_a_suite_overrides_the_regression_margin_and_primary_metric():
    own = SuiteConfig(name="general", path="x.jsonl", regression_margin=0.5, primary_metric="chrf")
    default = SuiteConfig(name="math", path="y.jsonl")
    assert suite_margin(own, 0.1) == 0.5 and suite_margin(default, 0.1) == 0.1
    assert suite_metric(own, "nll") == "chrf" and suite_metric(default, "nll") == "nll"


def test_a_suite_overrides_the_behaviour_budget_and_null_inherits_evaluates():
    e = Config.model_validate(
        {"data": {"sources": [{"name": "x", "path": "x.jsonl"}]}, "model": {"base": "m"}}
    ).evaluate
    own = SuiteConfig(name="general", path="x.jsonl", min_length_ratio=0.8, max_degenerate_rise=0.0)
    assert suite_budget(own, e) == (0.8, 0.0) and suite_budget(SuiteConfig(name="m", path="y.jsonl"), e) == (0.5, 0.1)
    assert (e.test_min_length_ratio, e.test_max_degenerate_rise) == (0.5, 0.1)
    off = e.model_copy(update={"min_length_ratio": None, "max_degenerate_rise": None})
    assert suite_budget(SuiteConfig(name="m", path="y.jsonl"), off) == (None, None)


def test_a_suite_takes_no_training_keys():
    with pytest.raises(ValueError, match="never trained on"):
        SuiteConfig(name="general", path="x.jsonl", weight=2.0)
    with pytest.raises(ValueError, match="suite names must be unique"):
        Config.model_validate(
            {
                "data": {"sources": [{"name": "x", "path": "x.jsonl"}]},
                "model": {"base": "m"},
                "evaluate": {"suites": [{"name": "a", "path": "a.jsonl"}, {"name": "a", "path": "b.jsonl"}]},
            }
        )


@pytest.mark.parametrize("problem", ["missing", "empty after validation"])
def test_a_missing_or_empty_suite_stops_evaluate_with_one_line_naming_it(
    tmp_path, tiny_model, monkeypatch, capsys, problem
):
    monkeypatch.chdir(tmp_path)
    suite = {"name": "general", "path": "suites/general.jsonl"}
    if problem != "missing":
        Path("suites").mkdir()
        write_jsonl(Path("suites/general.jsonl"), [{"prompt": "hi", "completion": ""}, {"question": "no answer"}])
    qa = [{"name": "qa", "path": str(write_jsonl("qa.jsonl", arithmetic_rows(40)))}]
    write_project(tiny_model, qa, train={"method": "lora"}, evaluate={"suites": [suite]})
    assert main(["ingest"]) == 0 and main(["format"]) == 0
    capsys.readouterr()
    assert main(["evaluate"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "evaluate.suites 'general'" in lines[0], lines
    assert (
        ("nothing matches" in lines[0])
        if problem == "missing"
        else ("no rows left" in lines[0] and "'rejected': 2" in lines[0])
    )
    assert not Path("metrics.json").exists()


def words(text: str) -> int:
    """Independent of evaluate/behaviour.py: whitespace-separated pieces holding a letter or a digit."""
    return sum(any(ch.isalnum() for ch in piece) for piece in text.split())


def read_table(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_metrics_json_mlflow_and_the_report_carry_the_behaviour_of_the_test_split_and_of_each_suite(
    project_folder, tiny_model
):
    write_jsonl(
        "general.jsonl",
        [{"prompt": f"what is {i} times two?", "completion": f"{i} times two is {2 * i}."} for i in range(12)],
    )
    qa = [{"name": "qa", "path": str(write_jsonl("qa.jsonl", arithmetic_rows(40)))}]
    cfg = formatted(
        write_project(
            tiny_model,
            qa,
            train={"method": "lora", "max_steps": 2, "micro_batch_size": 4},
            evaluate={
                "num_generations": 4,
                "max_new_tokens": 6,
                "bootstrap_resamples": 200,
                "suites": [{"name": "general", "path": "general.jsonl", "min_length_ratio": 0.25}],
            },
        )
    )
    run = run_train(cfg)
    run_evaluate(cfg)
    metrics = json.loads(Path("metrics.json").read_text())
    test, suite = metrics["behaviour"], metrics["suites"]["general"]["behaviour"]
    assert (test["gated_length_ratio"], test["min_length_ratio"], test["max_degenerate_rise"]) == (
        "length_ratio_to_reference",
        0.5,
        0.1,
    )
    assert (suite["gated_length_ratio"], suite["min_length_ratio"], suite["max_degenerate_rise"]) == (
        "length_ratio",
        0.25,
        0.1,
    )
    for block, table in ((test, "reports/generations.csv"), (suite, "reports/suites/general.csv")):
        rows = read_table(table)
        base_words = [words(r["base_output"]) for r in rows]
        tuned_words = [words(r["tuned_output"]) for r in rows]
        assert block["answers"] == len(rows) == 4
        assert block["words_mean_tuned"] == pytest.approx(sum(tuned_words) / 4)
        assert block["length_ratio"] == pytest.approx(sum(tuned_words) / sum(base_words))
        assert block["length_ratio_ci_low"] <= block["length_ratio"] <= block["length_ratio_ci_high"]
        for who in ("base", "tuned"):
            share = sum(r[f"{who}_degenerate"] != "" for r in rows) / 4
            assert block[f"degenerate_rate_{who}"] == pytest.approx(share)
            assert sum(block["degenerate_reasons"][who].values()) == share * 4
        assert block["degenerate_rise"] == pytest.approx(block["degenerate_rate_tuned"] - block["degenerate_rate_base"])
        for metric in ("exact_match", "rouge_l", "chrf", "stop_rate"):
            assert f"{metric}_tuned" in block and f"{metric}_change_ci_high" in block
        assert isinstance(block["broken"], list)

    [evaluated] = evaluation_runs(MlflowClient(run.tracking_uri), run.run_id)
    logged = evaluated.data.metrics
    assert logged["test_length_ratio_to_reference"] == pytest.approx(test["length_ratio_to_reference"])
    assert logged["test_degenerate_rate_base"] == pytest.approx(test["degenerate_rate_base"])
    assert logged["suite/general/length_ratio"] == pytest.approx(suite["length_ratio"])
    assert logged["suite/general/degenerate_rise_ci_high"] == pytest.approx(suite["degenerate_rise_ci_high"])
    html = Path("reports/report.html").read_text()
    assert "<h2>Behaviour</h2>" in html and "suite general" in html and f"{suite['length_ratio']:.4f}" in html
