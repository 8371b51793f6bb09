"""The pipeline operated as a team would, on one machine and for real: a `prefect server start` and an
`mlflow server` on loopback, the deployments of prefect.yaml, a process worker, runs triggered through the API
(what the UI's "Run" button does), the artifacts reviewers open, stage caching, evaluation alone, and two
variants at once. The team setup (both servers on PostgreSQL) is in test_operations_postgres.py."""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

import realstack
from realstack import background, http_json, make_repo, poll, prefect_env, sh

MODEL_NAME = "ops-sft"
RUN_TIMEOUT = 900  # seconds for one flow run on a busy 2-core machine (about 1-2 min when idle)


@dataclass
class Stack:
    repo: Path
    env: dict[str, str]  # a Prefect CLI's environment: PREFECT_API_URL, PREFECT_HOME, MLFLOW_TRACKING_URI
    api: str
    mlflow: str
    first_run: dict


def prefect(stack_env: dict, repo: Path, *args: str) -> str:
    return sh(sys.executable, "-m", "prefect", *args, cwd=repo, env=stack_env)


def trigger(env: dict, repo: Path, deployment: str, **parameters) -> str:
    """`prefect deployment run`, as the README says; returns the flow run id."""
    args = [f"--param={name}={json.dumps(value)}" for name, value in parameters.items()]
    out = prefect(env, repo, "deployment", "run", deployment, *args)
    return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def wait_done(api: str, flow_run_id: str) -> dict:
    def final():
        run = http_json("GET", f"{api}/flow_runs/{flow_run_id}")
        return run if run["state"] and run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

    return poll(final, RUN_TIMEOUT, f"flow run {flow_run_id} finishing", interval=3)


def logs(api: str, flow_run_id: str) -> str:
    records = http_json("POST", f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
    return "\n".join(r["message"] for r in records)


def completed(api: str, flow_run_id: str) -> dict:
    run = wait_done(api, flow_run_id)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{logs(api, flow_run_id)[-6000:]}"
    return run


def task_states(api: str, flow_run_id: str) -> dict[str, str]:
    runs = http_json("POST", f"{api}/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {r["name"].rsplit("-", 1)[0]: r["state"]["name"] for r in runs}  # task runs are named <task>-<suffix>


def artifacts(api: str, flow_run_id: str) -> dict[str, dict]:
    found = http_json("POST", f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"] or a["type"]: a for a in found}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, stories_model, gsm8k):
    """Servers up, the repo's deployments deployed, a worker polling the pool, one nightly run done."""
    tmp = tmp_path_factory.mktemp("ops")
    repo = make_repo(tmp / "repo", stories_model, gsm8k, rows=80, registered_model=MODEL_NAME, extra=("flows", "prefect.yaml"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(max_steps=3, checkpoint_every=None)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with realstack.mlflow_server(tmp / "mlflow") as mlflow_url, realstack.prefect_server(tmp / "prefect") as api:
        env = prefect_env(tmp / "prefect", api_url=api)
        env.update(MLFLOW_TRACKING_URI=mlflow_url, PWD=str(repo))  # prefect deploy reads $PWD for working_dir
        prefect(env, repo, "work-pool", "create", "sftops", "--type", "process", "--overwrite")  # as `make deploy`
        sh(sys.executable, "flows/deploy.py", "--all", cwd=repo, env=env)  # prefect deploy --all, see flows/deploy.py
        worker = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "sftops"]  # as `make worker`
        with background(worker, tmp / "worker.log", env=env, cwd=repo):
            first_run = completed(api, trigger(env, repo, "sft-pipeline/nightly"))
            yield Stack(repo, env, api, mlflow_url, first_run)


def test_the_nightly_deployment_is_scheduled_on_the_process_pool(stack):
    deployment = http_json("GET", f"{stack.api}/deployments/name/sft-pipeline/nightly")
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
    assert deployment["work_pool_name"] == "sftops" and deployment["parameters"] == {"params": "params.yaml", "overrides": []}
    assert deployment["job_variables"]["working_dir"] == str(stack.repo)
    evaluation = http_json("GET", f"{stack.api}/deployments/name/sft-evaluate/evaluate")
    assert evaluation["parameters"]["model"] == "models" and not evaluation["schedules"]


def test_a_triggered_run_completes_on_the_worker_with_its_artifacts_and_mlflow_run(stack):
    flow_run_id = stack.first_run["id"]
    assert task_states(stack.api, flow_run_id) == dict.fromkeys(("ingest", "format", "train", "evaluate"), "Completed")
    found = artifacts(stack.api, flow_run_id)
    assert {"sft-data-card", "sft-metrics", "sft-metrics-table", "sft-report", "sft-progress"} <= set(found)
    assert "Held-out response NLL" in found["sft-metrics"]["data"]
    assert found["sft-progress"]["data"] == 100.0
    assert {row["metric"] for row in json.loads(found["sft-metrics-table"]["data"])} >= {"nll", "rouge_l"}
    assert re.search(r"train step 3: train_loss \d", logs(stack.api, flow_run_id))  # training progress, step by step
    # The report link opens the HTML report through the MLflow server.
    link = re.search(r"\((http[^)]+)\)", found["sft-report"]["data"]).group(1)
    with urllib.request.urlopen(link, timeout=30) as response:
        assert b"<html" in response.read(2000).lower()
    run_info = json.loads((stack.repo / "models/run.json").read_text())
    client = MlflowClient(stack.mlflow)
    assert len(client.get_metric_history(run_info["run_id"], "train_loss")) == 3
    assert client.get_model_version(MODEL_NAME, run_info["version"]).run_id == run_info["run_id"]


def test_a_train_param_change_reruns_train_and_evaluate_but_not_ingest_or_format(stack):
    params_file = stack.repo / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["train"]["learning_rate"] = 0.001
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    flow_run_id = trigger(stack.env, stack.repo, "sft-pipeline/nightly")
    completed(stack.api, flow_run_id)
    assert task_states(stack.api, flow_run_id) == {"ingest": "Cached", "format": "Cached", "train": "Completed", "evaluate": "Completed"}
    run_info = json.loads((stack.repo / "models/run.json").read_text())
    assert MlflowClient(stack.mlflow).get_run(run_info["run_id"]).data.params["train.learning_rate"] == "0.001"


RATES = ("0.002", "0.004")


@pytest.fixture(scope="module")
def at_once(stack):
    """Three runs triggered together: two variants of the pipeline and the evaluation of the nightly model."""
    ids = [trigger(stack.env, stack.repo, "sft-pipeline/nightly", overrides=[f"train.learning_rate={r}"]) for r in RATES]
    ids.append(trigger(stack.env, stack.repo, "sft-evaluate/evaluate", model="models"))
    return [completed(stack.api, i) for i in ids]


def test_the_evaluate_deployment_reviews_a_given_model(stack, at_once):
    run_info = json.loads((stack.repo / "models/run.json").read_text())
    flow_run_id = at_once[2]["id"]
    assert set(task_states(stack.api, flow_run_id)) == {"evaluate"}
    assert {"sft-metrics", "sft-report"} <= set(artifacts(stack.api, flow_run_id))
    [metrics_file] = (stack.repo / "runs").glob("eval-*/metrics.json")
    assert json.loads(metrics_file.read_text())["test_rows"] > 0
    assert "test_tuned_nll" in MlflowClient(stack.mlflow).get_run(run_info["run_id"]).data.metrics


def test_two_variants_run_at_once_into_their_own_folders_and_mlflow_runs(stack, at_once):
    first, second = at_once[:2]
    assert first["start_time"] < second["end_time"] and second["start_time"] < first["end_time"]  # they overlapped
    client = MlflowClient(stack.mlflow)
    infos = [json.loads(f.read_text()) for f in sorted((stack.repo / "runs").glob("*/models/run.json"))]
    assert len(infos) == 2 and infos[0]["run_id"] != infos[1]["run_id"]
    assert sorted(client.get_run(i["run_id"]).data.params["train.learning_rate"] for i in infos) == sorted(RATES)
    for info in infos:
        assert client.get_run(info["run_id"]).info.status == "FINISHED"
        assert len(client.get_metric_history(info["run_id"], "train_loss")) == 3
