"""Model review on the tiny model, in-process, with a real MLflow SQLite store: the evaluation's numbers,
table and report, the base-model cache, the promotion gate both ways, and answering from the registry."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import QA, formatted, qa_rows, write_jsonl, write_project
from realstack import evaluation_runs
from sftops.cli import main
from sftops.config import Config
from sftops.stages.evaluate import run_evaluate
from sftops.stages.train import TrainResult, run_train
from sftops.tracking import registry

GOOD = {"method": "full", "max_steps": 20, "micro_batch_size": 8, "learning_rate": 0.01}
BAD = {"method": "full", "max_steps": 1, "micro_batch_size": 8, "learning_rate": 0.0001}


@pytest.fixture
def workdir(project_folder, tiny_model):
    """Two sources in tmp_path, ingested and formatted once per test; returns a function: train params -> config."""
    sources = [
        {"name": name, "path": str(write_jsonl(f"{name}.jsonl", qa_rows(60, [pair])))}
        for name, pair in zip(("math", "chat"), QA)
    ]

    def make(train: dict, evaluate: dict | None = None) -> Config:
        evaluate = {"num_generations": 4, "max_new_tokens": 6, "bootstrap_resamples": 300, **(evaluate or {})}
        return formatted(write_project(tiny_model, sources, train=train, evaluate=evaluate))

    return make


def promote(run: TrainResult, metrics: dict, cfg: Config, versioned: bool = True) -> dict:
    """The pipeline flow's record and promote steps, as the flow calls them once the run is in git and DVC (with
    the run's record, run.json)."""
    record = asdict(run)
    if versioned:
        registry.record_version(record, {registry.VERSIONED: "true", registry.VERSIONED_REASON: "recorded by the test"})
    return registry.promote(record, metrics, cfg.evaluate.primary_metric, cfg.evaluate.promotion_margin).as_dict()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluation_reports_the_paired_difference_per_source_with_table_report_curves_and_caches_the_base(
    tmp_path, workdir
):
    cfg = workdir(GOOD)
    run = run_train(cfg)
    result = run_evaluate(cfg)
    m = result.metrics
    on_disk = json.loads(Path("metrics.json").read_text())
    assert on_disk["nll_improvement"] == m["nll_improvement"] and "base_eval_cached" not in on_disk
    # Independent recomputation of the headline number from the per-row file.
    rows = read_csv(Path("reports/nll_by_row.csv"))
    tokens = sum(int(r["response_tokens"]) for r in rows)
    gap = sum((float(r["base_nll"]) - float(r["tuned_nll"])) * int(r["response_tokens"]) for r in rows) / tokens
    assert len(rows) == m["test_rows"] and gap == pytest.approx(m["nll_improvement"])
    assert m["base"]["nll"] - m["tuned"]["nll"] == pytest.approx(m["nll_improvement"])
    assert m["nll_improvement_ci_low"] <= m["nll_improvement"] <= m["nll_improvement_ci_high"]
    assert m["nll_improvement_ci_low"] > 0 and m["win_rate"] == 1.0  # a random-init model on a repetitive task
    assert set(m["per_source"]) == {"math", "chat"}
    assert sum(s["rows"] for s in m["per_source"].values()) == m["test_rows"]
    for key in ("exact_match", "rouge_l", "chrf", "response_words_mean", "stopped_rate"):
        assert key in m["tuned"] and key in m["base"]

    table = read_csv(Path("reports/generations.csv"))
    assert len(table) == m["generations"] == 4
    assert {"prompt", "reference", "base_output", "tuned_output", "tuned_chrf", "base_exact_match", "source"} <= set(
        table[0]
    )
    html = Path("reports/report.html").read_text()
    assert f"{m['nll_improvement_ci_low']:+.4f}" in html and "<svg" in html and "champion (preview)" in html
    curve = read_csv(Path("models/train_curve.csv"))
    assert [int(r["step"]) for r in curve] == list(range(1, 21))
    assert [int(r["step"]) for r in read_csv(Path("models/val_curve.csv"))] == [0, 20]

    client = MlflowClient(run.tracking_uri)
    logged = client.get_run(run.run_id)
    [evaluated] = evaluation_runs(client, run.run_id)  # the evaluation is a run of its own, a child of training's
    assert evaluated.data.metrics["test_nll_improvement_ci_low"] == pytest.approx(m["nll_improvement_ci_low"])
    assert evaluated.data.metrics["test_source/math/win_rate"] == m["per_source"]["math"]["win_rate"]
    artifacts = {a.path for a in client.list_artifacts(evaluated.info.run_id, "eval")}
    assert {"eval/report.html", "eval/nll_by_row.csv", "eval/generations.json"} <= artifacts
    assert "promotion.decision" not in logged.data.tags  # evaluation never moves an alias: the promote step does
    first_decision = promote(run, m, cfg)
    assert (
        first_decision["alias"] == "champion"
        and client.get_run(run.run_id).data.tags["promotion.decision"] == "champion"
    )
    version = client.get_model_version("tiny", run.version)
    for tag in ("base_model", "method", "data.curated_dvc_md5", "git.commit", "params.sha256"):
        assert tag in version.tags or (tag == "git.commit" and "git.commit" not in logged.data.tags), tag
    assert f"{m['nll_improvement_ci_low']:+.4f}" in version.description and "champion" in version.description
    manifest = json.loads(
        Path(client.download_artifacts(run.run_id, "reproduce/manifest.json", str(tmp_path))).read_text()
    )
    assert manifest["params"]["train"]["max_steps"] == 20 and manifest["model"]["version"] == run.version
    assert manifest["data"]["curated_dvc_md5"] == version.tags["data.curated_dvc_md5"]
    assert {"tokenizer_sha256", "chat_template_sha256", "files"} <= set(manifest["model"])

    # The base model's results were cached: a second evaluation reads them instead of recomputing.
    first = result
    assert not first.base_eval_cached
    entries = list((tmp_path / "cache" / "base-eval").glob("*.json"))
    assert len(entries) == 1
    # Mark the cached base outputs: if the second run recomputed them, the mark would not come back.
    entry = json.loads(entries[0].read_text())
    entry["completions"] = [{**c, "text": "FROM-CACHE"} for c in entry["completions"]]
    entries[0].write_text(json.dumps(entry))
    second = run_evaluate(cfg)
    assert second.base_eval_cached and second.metrics["base"]["nll"] == first.metrics["base"]["nll"]
    assert {r["base_output"] for r in read_csv(Path("reports/generations.csv"))} == {"FROM-CACHE"}
    assert promote(run, second.metrics, cfg) == {
        **first_decision,
        "reason": "already the champion (re-evaluated)",
        "champion_version": run.version,
        "champion_value": first.metrics["tuned"]["nll"],
    }
    # Another eval setting the base outputs depend on is another key: computed afresh.
    third = run_evaluate(workdir(GOOD, {"max_new_tokens": 5}))
    assert not third.base_eval_cached and len(list((tmp_path / "cache" / "base-eval").glob("*.json"))) == 2


def test_champion_moves_only_for_a_better_model_with_passing_data_checks(tmp_path, workdir, capsys):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def train_and_evaluate(train: dict, versioned: bool = True) -> tuple[dict, dict]:
        # The test split's length budget off: the barely trained model answers random bytes as its random-init base
        # does, a fifth of a reference's words, which that budget rightly refuses; this test is about the NLL gate.
        cfg = workdir(train, {"test_min_length_ratio": None})
        run, metrics = run_train(cfg), run_evaluate(cfg).metrics
        return run, {**metrics, "promotion": promote(run, metrics, cfg, versioned)}

    def champion() -> str:
        return str(client.get_model_version_by_alias("tiny", "champion").version)

    weak, m_weak = train_and_evaluate(BAD)
    assert m_weak["promotion"]["alias"] == "champion" and champion() == weak.version  # no champion yet

    # Better than the champion, but the data self-checks failed: kept out.
    stats = Path("data/curated/stats.json")
    original = stats.read_text()
    stats.write_text(json.dumps({**json.loads(original), "checks_passed": False}))
    blocked, m_blocked = train_and_evaluate(GOOD)
    assert m_blocked["tuned"]["nll"] < m_weak["tuned"]["nll"]
    assert m_blocked["promotion"]["alias"] == "challenger" and "data checks failed" in m_blocked["promotion"]["reason"]
    assert champion() == weak.version

    stats.write_text(original)
    # Better, checks passed, but its data was never recorded in git and DVC (a bare `dvc repro`): kept out.
    unrecorded, m_unrecorded = train_and_evaluate(GOOD, versioned=False)
    assert m_unrecorded["promotion"]["alias"] == "challenger" and "not versioned" in m_unrecorded["promotion"]["reason"]
    assert client.get_model_version("tiny", unrecorded.version).tags["data.versioned"] == "false"
    assert champion() == weak.version

    strong, m_strong = train_and_evaluate(GOOD)
    assert m_strong["promotion"]["alias"] == "champion" and champion() == strong.version
    assert "beats it by more than the margin" in m_strong["promotion"]["reason"]
    worse, m_worse = train_and_evaluate(BAD)
    assert m_worse["promotion"]["alias"] == "challenger" and champion() == strong.version
    assert str(client.get_model_version_by_alias("tiny", "challenger").version) == worse.version
    run = client.get_run(worse.run_id)
    assert run.data.tags["promotion.decision"] == "challenger" and "does not beat" in run.data.tags["promotion.reason"]
    assert client.get_model_version("tiny", worse.version).tags["promotion.decision"] == "challenger"

    # The champion answers from the registry, and so do a run id, a runs:/ URI and the local folder.
    capsys.readouterr()
    named = f"runs:/{strong.run_id}/tiny-{strong.run_id[:8]}"  # the logged model, by the name the UI lists it under
    for model in ("models:/tiny@champion", strong.run_id, named, "models/model"):
        assert main(["generate", "--model", model, "--prompt", "what is two plus two?", "--max-new-tokens", "4"]) == 0
        assert capsys.readouterr().out.startswith("> what is two plus two?\n")
    assert main(["generate", "--model", "models:/tiny@nonexistent", "--prompt", "hi"]) == 2
