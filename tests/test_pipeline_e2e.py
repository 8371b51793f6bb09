"""The walking pipeline for real: a temporary git + DVC repo where `dvc repro` runs all four stages on the
pre-trained stories260K model and GSM8K rows, tracked in a real MLflow SQLite store; and the Prefect flow."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from realstack import ROOT, evaluation_runs, make_repo, sh, tool_env, training_runs

MODEL_NAME = "tiny-sft"


@pytest.fixture(scope="module")
def repro(tmp_path_factory, stories_model, gsm8k):
    repo = make_repo(tmp_path_factory.mktemp("e2e") / "repo", stories_model, gsm8k)
    out = sh(sys.executable, "-m", "dvc", "repro", cwd=repo, env=tool_env())
    sh("git", "add", "dvc.lock", ".gitignore", cwd=repo)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "repro", cwd=repo)
    return repo, out


def test_dvc_repro_runs_all_stages_and_sft_helps(repro):
    repo, out = repro
    for stage in ("ingest", "format", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((repo / "metrics.json").read_text())
    assert metrics["tuned"]["nll"] < metrics["base"]["nll"] - 0.3, metrics
    assert (repo / "models/model/adapter_model.safetensors").exists()
    with (repo / "reports/generations.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == metrics["generations"] == 3
    assert all(row["reference"] and row["tuned_output"] is not None for row in table)
    shown = sh(sys.executable, "-m", "dvc", "metrics", "show", "--json", cwd=repo, env=tool_env())
    assert "nll_improvement" in shown


def test_repro_again_has_nothing_to_do_and_lr_change_reruns_train_and_evaluate_only(repro):
    repo, _ = repro
    env = tool_env()
    status = sh(sys.executable, "-m", "dvc", "status", "--json", cwd=repo, env=env)
    assert json.loads(status) == {}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["learning_rate"] = 0.001
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = json.loads(sh(sys.executable, "-m", "dvc", "status", "--json", cwd=repo, env=env))
    # evaluate depends on train's output, which DVC reports as changed once train has re-run.
    assert set(changed) == {"train"}
    out = sh(sys.executable, "-m", "dvc", "repro", cwd=repo, env=env)
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert "Stage 'ingest' didn't change, skipping" in out and "Stage 'format' didn't change, skipping" in out
    # DVC compares the new metrics with the committed run's, and shows the loss curves.
    diff = json.loads(sh(sys.executable, "-m", "dvc", "metrics", "diff", "--json", cwd=repo, env=env))["metrics.json"]
    assert diff["tuned.nll"]["old"] != diff["tuned.nll"]["new"]
    plots = json.loads(sh(sys.executable, "-m", "dvc", "plots", "show", "--json", cwd=repo, env=env))["data"]
    assert {"models/train_curve.csv", "validation"} <= set(plots)
    steps = [int(p["step"]) for p in plots["models/train_curve.csv"][0]["content"]["data"]["values"]]
    assert steps == list(range(1, params["train"]["max_steps"] + 1))


def test_mlflow_holds_run_metrics_lineage_and_a_loadable_registered_model(repro):
    repo, _ = repro
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    run_info = json.loads((repo / "models/run.json").read_text())
    run = client.get_run(run_info["run_id"])
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 13))
    assert {"learning_rate", "grad_norm", "val_nll"} <= set(run.data.metrics)
    [evaluated] = evaluation_runs(client, run.info.run_id)  # the evaluate stage's own run, a child of this one
    assert {"test_tuned_nll", "test_base_nll", "test_tuned_rouge_l"} <= set(evaluated.data.metrics)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert float(run.data.params["train.learning_rate"]) == params["train"]["learning_rate"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    curated_md5 = next(o["md5"] for o in lock["stages"]["format"]["outs"] if o["path"] == "data/curated")
    assert run.data.tags["data.curated_dvc_md5"] == curated_md5
    assert "git.commit" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(evaluated.info.run_id, "eval")}
    assert "eval/generations.json" in artifacts

    version = client.get_model_version(MODEL_NAME, run_info["version"])
    assert version.run_id == run.info.run_id
    assert not any(key.startswith("test_") for key in version.tags)  # results live in the evaluation runs
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    cwd = os.getcwd()
    os.chdir(repo)  # the default artifact root (./mlruns) is relative to the repo
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{run_info['version']}")
        question = "Tom has 3 apples and buys 2 more. How many apples does he have?"
        replies = model.predict({"messages": [{"role": "user", "content": question}], "max_tokens": 8})
    finally:
        os.chdir(cwd)
    assert len(replies) == 1 and replies[0]["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(replies[0]["choices"][0]["message"]["content"], str)


def test_a_flow_run_with_overrides_is_a_dvc_experiment_logging_to_the_project_store(tmp_path, stories_model, gsm8k):
    """`--set` makes the run a DVC experiment in a temporary workspace; its MLflow run and registered version
    land in the project's own mlflow.db (never in one inside the temporary workspace), and `dvc exp show`
    lists it with its params and metrics; the workspace's outputs are untouched."""
    repo = make_repo(tmp_path / "flowrepo", stories_model, gsm8k, rows=80)
    env = tool_env()
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "flows/sft_pipeline.py"), "--set", "train.max_steps=3", "--name", "three-steps"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "Finished in state Completed" in log and "Running stage 'train'" in log
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = training_runs(client)
    assert len(runs) == 1 and len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 3
    assert len(evaluation_runs(client, runs[0].info.run_id)) == 1
    assert runs[0].data.params["train.max_steps"] == "3"
    [version] = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert version.tags["dvc.experiment"] == "three-steps" and version.tags["data.versioned"] == "true"
    assert version.tags["dvc.curated_md5"] == runs[0].data.tags["data.curated_dvc_md5"]
    shown = json.loads(sh(sys.executable, "-m", "dvc", "exp", "show", "--json", cwd=repo, env=env))
    [exp] = [
        rev for b in shown for e in b.get("experiments") or [] for rev in e["revs"] if rev["name"] == "three-steps"
    ]
    assert exp["data"]["params"]["params.yaml"]["data"]["train"]["max_steps"] == 3
    assert exp["data"]["metrics"]["metrics.json"]["data"]["test_rows"] > 0
    assert not (repo / "metrics.json").exists() and not (repo / "models").exists()
