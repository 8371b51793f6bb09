"""Secrets never reach an output: fake hub tokens, cloud keys, a Prefect key, a database password and a
password in the tracking URI are planted in the environment and the config, the whole pipeline runs against a
real `mlflow server`, and every output is scanned for them: the server's database and artifacts, data/,
models/, reports/, metrics.json, checkpoints, caches, the Prefect flow's markdown, the config errors, and the
captured stdout, stderr and server log."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import arithmetic_rows, sftops, write_jsonl, write_project
from sftops.config import load_config
from sftops.errors import ConfigError
from sftops.tracking import registry

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).parents[1]

ENV_SECRETS = {
    "HF_TOKEN": "hf_FAKEsftopsTOKEN0123456789abcdefXYZ",
    "HUGGING_FACE_HUB_TOKEN": "hf_FAKEsftopsHUBTOKEN0123456789abcdef",
    "AWS_ACCESS_KEY_ID": "AKIAFAKESFTOPS000001",
    "AWS_SECRET_ACCESS_KEY": "fakeSftopsAwsSecretKey/0123456789abcdefXYZ",
    "PREFECT_API_KEY": "pnu_FAKEsftopsPrefectKey0123456789",
    "DATABASE_URL": "postgresql://sftops:PgFakePassw0rd-sftops@db.invalid:5432/mlflow",
}
URI_PASSWORD = "UriFakePassw0rd-sftops"
CONFIG_SECRET = "hf_FAKEsftopsCONFIG0123456789abcdef"
PLANTED = [
    "hf_FAKEsftopsTOKEN0123456789abcdefXYZ",
    "hf_FAKEsftopsHUBTOKEN0123456789abcdef",
    "AKIAFAKESFTOPS000001",
    "fakeSftopsAwsSecretKey/0123456789abcdefXYZ",
    "pnu_FAKEsftopsPrefectKey0123456789",
    "PgFakePassw0rd-sftops",
    URI_PASSWORD,
    CONFIG_SECRET,
]


def flow_module():
    spec = importlib.util.spec_from_file_location("sft_pipeline_flow", ROOT / "flows" / "sft_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_planted_secrets_reach_no_output(tmp_path, tiny_model, mlflow_server_process, monkeypatch, figures):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    write_project(
        tiny_model,
        [{"name": "qa", "path": str(write_jsonl("qa.jsonl", arithmetic_rows(60)))}],
        train={"method": "lora", "max_steps": 2, "micro_batch_size": 8, "checkpoint_every": 1, "keep_checkpoints": 1},
        evaluate={"num_generations": 2, "max_new_tokens": 4, "bootstrap_resamples": 50},
        tracking={"registered_model_name": "secretive"},
    )
    params = yaml.safe_load(Path("params.yaml").read_text())
    host = mlflow_server_process.url.removeprefix("http://")
    env = {
        **os.environ,
        **ENV_SECRETS,
        "PYTHONPATH": str(ROOT / "src"),
        "SFTOPS_CACHE_DIR": str(project / ".cache"),
        "MLFLOW_TRACKING_URI": f"http://sftops:{URI_PASSWORD}@{host}",
    }
    done = sftops("run", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    texts = {"stdout of sftops run": done.stdout, "stderr of sftops run": done.stderr}

    # In the config: a secret under a key that does not exist, and one given to a key of another type.
    tree = {**params, "model": {**params["model"], "hub_token": CONFIG_SECRET}}
    (tmp_path / "secret-params.yaml").write_text(yaml.safe_dump(tree))  # the user's input, outside the outputs
    for path, overrides in (
        (tmp_path / "secret-params.yaml", []),
        ("params.yaml", [f"train.seed={CONFIG_SECRET}"]),
        ("params.yaml", [f"model.base=https://user:{URI_PASSWORD}@hub.invalid/model"]),
    ):
        with pytest.raises(ConfigError) as err:
            load_config(path, [*overrides, "train.max_steps=nope"])
        texts[f"config error {Path(path).name} {overrides[:1]}"] = str(err.value)
    # The Prefect flow's markdown artifacts, built by the flow's own functions from this run's results.
    client = MlflowClient(mlflow_server_process.url)
    run_info = json.loads(Path("models/run.json").read_text())
    measured = json.loads(Path("metrics.json").read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    decision = registry.promote(run_info, measured, "nll", 0.0)  # what the flow's promote step does after recording
    run = client.get_run(run_info["run_id"])
    metrics = {**measured, "report": "reports/report.html", "promotion": decision.as_dict()}
    flow = flow_module()
    cfg = load_config("params.yaml")
    texts["prefect artifact sft-metrics"] = flow.metrics_markdown(metrics, cfg)
    texts["prefect artifact sft-data-card"] = flow.data_card(cfg)
    texts["mlflow run params and tags"] = json.dumps({"params": run.data.params, "tags": run.data.tags})

    files = [p for root in (project, mlflow_server_process.store) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any("artifacts" in p.parts for p in files)
    assert {"data", "models", "reports", "metrics.json"} <= {
        p.relative_to(project).parts[0] for p in files if project in p.parents
    }
    found = [(str(p), s) for p in files for s in PLANTED if s.encode() in p.read_bytes()]
    found += [(where, s) for where, text in texts.items() for s in PLANTED if s in text]
    assert found == []
    figures["secrets planted"] += len(PLANTED)
    figures["outputs scanned for secrets (files and streams)"] += len(files) + len(texts)
    figures["secrets found in outputs"] += len(found)
