"""The walking pipeline for real: a temporary git + DVC repo where `dvc repro` runs all four stages on the
pre-trained stories260K model and GSM8K rows, tracked in a real MLflow SQLite store; and the Prefect flow."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from sftops.config import isolate_outputs, load_config

from conftest import sh, tool_env

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny-sft"


def small_params(model: Path, data: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"] = {"sources": [{"name": "gsm8k", "path": str(data)}], "val_fraction": 0.1, "test_fraction": 0.15, "split_seed": 0}
    params["model"] = {"base": str(model), "gguf_file": None, "max_length": 512}
    params["train"].update({"max_steps": 12, "micro_batch_size": 8, "grad_accum_steps": 1, "learning_rate": 0.003, "warmup_ratio": 0.1})
    params["evaluate"] = {"batch_size": 16, "num_generations": 3, "max_new_tokens": 12}
    params["tracking"]["registered_model_name"] = MODEL_NAME
    return params


def make_repo(path: Path, model: Path, gsm8k: Path, rows: int = 160) -> Path:
    path.mkdir()
    for item in ("dvc.yaml", "src", "data/sources/README.md", ".gitignore"):
        src, dst = ROOT / item, path / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")) if src.is_dir() else shutil.copy(src, dst)
    lines = (gsm8k / "train.jsonl").read_text().splitlines()[:rows]
    (path / "data/sources/gsm8k.jsonl").write_text("\n".join(lines) + "\n")
    (path / "params.yaml").write_text(yaml.safe_dump(small_params(model, Path("data/sources/gsm8k.jsonl")), sort_keys=False))
    env = tool_env()
    sh("git", "init", "-q", cwd=path)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init", cwd=path)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=path, env=env)
    sh(sys.executable, "-m", "dvc", "config", "core.analytics", "false", cwd=path, env=env)
    sh("git", "add", "-A", cwd=path)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "pipeline", cwd=path)
    return path


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
    assert {"learning_rate", "grad_norm", "val_nll", "test_tuned_nll", "test_base_nll", "test_tuned_rouge_l"} <= set(run.data.metrics)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert float(run.data.params["train.learning_rate"]) == params["train"]["learning_rate"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    curated_md5 = next(o["md5"] for o in lock["stages"]["format"]["outs"] if o["path"] == "data/curated")
    assert run.data.tags["data.curated_dvc_md5"] == curated_md5
    assert "git.commit" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert "eval/generations.json" in artifacts

    version = client.get_model_version(MODEL_NAME, run_info["version"])
    assert version.run_id == run.info.run_id
    assert "test_nll" in version.tags
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    cwd = os.getcwd()
    os.chdir(repo)  # the default artifact root (./mlruns) is relative to the repo
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{run_info['version']}")
        replies = model.predict(["Tom has 3 apples and buys 2 more. How many apples does he have?"], params={"max_new_tokens": 8})
    finally:
        os.chdir(cwd)
    assert len(replies) == 1 and isinstance(replies[0], str) and replies[0]


def test_prefect_flow_runs_the_same_stages(tmp_path, stories_model, gsm8k):
    repo = make_repo(tmp_path / "flowrepo", stories_model, gsm8k, rows=80)
    env = tool_env()
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "flows/sft_pipeline.py"), "--set", "train.max_steps=3"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "Finished in state Completed" in log
    for task in ("ingest", "format", "train", "evaluate"):
        assert f"{task}-" in log  # Prefect names task runs '<task>-<suffix>'
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sftops").experiment_id])
    assert len(runs) == 1 and len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 3
    assert runs[0].data.tags["data.curated_dvc_md5"].endswith(".dir")
    # A run with overrides is an experiment: its outputs go under runs/<digest>/, not over DVC's.
    cfg = isolate_outputs(load_config(repo / "params.yaml", ["train.max_steps=3"]), ["train.max_steps=3"])
    assert json.loads((repo / cfg.paths.metrics).read_text())["test_rows"] > 0
    assert cfg.paths.metrics.startswith("runs/") and not (repo / "metrics.json").exists()
