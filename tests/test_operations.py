"""The pipeline operated as a team would, for real: a git repository with a bare `origin` and a local-folder DVC
remote, an `mlflow server` and a `prefect server start` on loopback, the deployments of prefect.yaml (pinned to a
pushed commit), a process worker, runs triggered through the API (what the UI's "Run" button does). Proved here:
each task runs its stage through DVC and says what DVC did; the run is recorded as a DVC experiment pushed to the
remotes (`record.push_to: origin`), and its version's restore command, run as written anywhere, restores the
champion's exact data and model in a fresh clone; DVC's run-cache restores earlier params without training;
variants run at once as DVC experiments into one registry; `dvc repro`, the flow run by hand and the deployment
write the same dvc.lock. The team setup (both servers on PostgreSQL) is in test_operations_postgres.py."""

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
from realstack import background, git_commit, http_json, make_repo, poll, prefect_env, sh
from sftops.provenance.manifest import dvc_md5

MODEL_NAME = "ops-sft"
RUN_TIMEOUT = 900  # seconds for one flow run on a busy 2-core machine (about 1-2 min when idle)
STAGES = ("ingest", "format", "train", "evaluate", "export")


@dataclass
class Stack:
    repo: Path  # the team's checkout, where code and params change and get pushed
    clone: Path  # the deployment's clone, where the runs happen
    origin: Path
    remote: Path  # the DVC remote
    env: dict[str, str]  # a Prefect CLI's environment: PREFECT_API_URL, PREFECT_HOME, MLFLOW_TRACKING_URI, SFTOPS_*
    api: str
    mlflow: str
    first_run: dict


def prefect(env: dict, repo: Path, *args: str) -> str:
    return sh(sys.executable, "-m", "prefect", *args, cwd=repo, env=env)


def dvc(env: dict, repo: Path, *args: str) -> str:
    return sh(sys.executable, "-m", "dvc", *args, cwd=repo, env=env)


def deploy(stack_env: dict, repo: Path) -> None:
    """What `make deploy` does (pinning HEAD, which must be pushed)."""
    env = {k: v for k, v in stack_env.items() if k != "SFTOPS_COMMIT"}
    sh(sys.executable, "flows/deploy.py", "--all", cwd=repo, env=env)


def push_change(stack: Stack, message: str, change) -> None:
    params_file = stack.repo / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    change(params)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "add", "params.yaml", cwd=stack.repo)
    git_commit(stack.repo, message)
    sh("git", "push", "-q", "origin", "main", cwd=stack.repo)
    deploy(stack.env, stack.repo)


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


def task_runs(api: str, flow_run_id: str) -> list[dict]:
    return http_json("POST", f"{api}/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}})


def task_states(api: str, flow_run_id: str) -> dict[str, str]:
    return {r["name"].rsplit("-", 1)[0]: r["state"]["name"] for r in task_runs(api, flow_run_id)}  # <task>-<suffix>


def artifacts(api: str, flow_run_id: str) -> dict[str, dict]:
    found = http_json("POST", f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"] or a["type"]: a for a in found}


def mlflow_runs(mlflow: str) -> list:
    return realstack.training_runs(MlflowClient(mlflow))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, stories_model, gsm8k):
    """Origin, DVC remote, servers, the deployments pinned to the pushed HEAD, a worker, one nightly run done."""
    tmp = tmp_path_factory.mktemp("ops")
    repo = make_repo(
        tmp / "repo",
        stories_model,
        gsm8k,
        rows=80,
        registered_model=MODEL_NAME,
        extra=("flows", "prefect.yaml", ".dvcignore"),
    )
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(max_steps=3, checkpoint_every=None)
    params["record"]["push_to"] = "origin"  # the team turns pushing on (a clone pushes nothing by default)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    origin, remote = tmp / "origin.git", tmp / "dvc-remote"
    env = realstack.tool_env()
    sh("git", "init", "-q", "--bare", str(origin), cwd=tmp)
    sh("git", "symbolic-ref", "HEAD", "refs/heads/main", cwd=origin)
    sh("git", "branch", "-M", "main", cwd=repo)
    sh("git", "remote", "add", "origin", str(origin), cwd=repo)
    dvc(env, repo, "remote", "add", "-d", "store", str(remote))
    sh("git", "add", "-A", cwd=repo)
    git_commit(repo, "small params, a DVC remote")
    sh("git", "push", "-q", "-u", "origin", "main", cwd=repo)
    with realstack.mlflow_server(tmp / "mlflow") as mlflow_url, realstack.prefect_server(tmp / "prefect") as api:
        env = prefect_env(tmp / "prefect", api_url=api)
        env.update(MLFLOW_TRACKING_URI=mlflow_url, SFTOPS_DEPLOY_DIR=str(tmp / "deployments"))
        prefect(env, repo, "work-pool", "create", "sftops", "--type", "process", "--overwrite")  # as `make deploy`
        prefect(env, repo, "global-concurrency-limit", "create", "sftops-registry", "--limit", "1")
        deploy(env, repo)
        worker = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "sftops"]  # as `make worker`
        with background(worker, tmp / "worker.log", env=env, cwd=tmp):
            first_run = completed(api, trigger(env, repo, "sft-pipeline/nightly"))
            yield Stack(repo, tmp / "deployments" / "sftops", origin, remote, env, api, mlflow_url, first_run)


def test_the_deployments_run_pinned_code_and_the_nightly_one_at_a_time(stack):
    nightly = http_json("GET", f"{stack.api}/deployments/name/sft-pipeline/nightly")
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert deployment_limit(nightly) == 1 and nightly["work_pool_name"] == "sftops"
    [clone] = [step[name] for step in nightly["pull_steps"] for name in step if name.endswith(".git_clone")]
    assert clone["repository"] == str(stack.origin)
    assert clone["commit_sha"] == sh("git", "rev-parse", "HEAD", cwd=stack.repo).strip()
    assert sh("git", "rev-parse", "HEAD", cwd=stack.clone).strip() == clone["commit_sha"]
    sweep = http_json("GET", f"{stack.api}/deployments/name/sft-pipeline/sweep")
    assert not sweep["schedules"] and deployment_limit(sweep) is None


def deployment_limit(deployment: dict) -> int | None:
    """A deployment's concurrency limit (Prefect keeps it as a global concurrency limit of the deployment's own)."""
    return (deployment.get("global_concurrency_limit") or {}).get("limit") or deployment.get("concurrency_limit")


def test_each_task_runs_its_dvc_stage_in_a_chain_and_says_what_dvc_did(stack):
    flow_run_id = stack.first_run["id"]
    states = task_states(stack.api, flow_run_id)
    assert states == {**dict.fromkeys(STAGES, "Ran"), "record": "Recorded", "promote": "Champion"}
    # The graph is the chain: each stage's task takes the previous one's result as an input.
    runs = {r["name"].rsplit("-", 1)[0]: r for r in task_runs(stack.api, flow_run_id)}
    for before, after in zip(STAGES, (*STAGES[1:], "record")):
        upstream = [i["id"] for inputs in runs[after]["task_inputs"].values() for i in inputs]
        assert runs[before]["id"] in upstream, (before, after)
    text = logs(stack.api, flow_run_id)
    assert re.search(r"train step 3: train_loss \d", text)  # the stage's own lines, as DVC ran it
    assert "Running stage 'train'" in text
    found = artifacts(stack.api, flow_run_id)
    assert {"sft-dvc", "sft-data-card", "sft-metrics", "sft-metrics-table", "sft-report", "sft-progress"} <= set(found)
    assert "Rows labelled: 0 of " in found["sft-review-feedback"]["data"]  # nobody has labelled the new version yet
    assert "| train | Ran |" in found["sft-dvc"]["data"] and "Held-out response NLL" in found["sft-metrics"]["data"]
    link = re.search(r"\((http[^)]+)\)", found["sft-report"]["data"]).group(1)
    with urllib.request.urlopen(link, timeout=30) as response:  # the report, through the MLflow server
        assert b"<html" in response.read(2000).lower()


def test_the_champion_is_recorded_in_git_and_dvc_and_a_fresh_clone_restores_it_from_the_registry(stack, tmp_path):
    client = MlflowClient(stack.mlflow)
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    tags = champion.tags
    assert tags["data.versioned"] == "true" and "pushed to git remote 'origin'" in tags["data.versioned_reason"]
    assert tags["data.restorable"] == "anywhere" and "DVC remote 'store'" in tags["restore.where"]
    assert tags["git.ref"] in sh("git", "ls-remote", str(stack.origin), cwd=tmp_path)
    assert tags["dvc.curated_md5"] == tags["data.curated_dvc_md5"]  # what DVC recorded is what the model trained on
    # A new user, with nothing but the registry URI, anywhere: the restore command the version carries, as written
    # (it clones the repository, pulls the experiment and its outputs, applies it).
    env = realstack.tool_env()
    sh("bash", "-c", tags["restore"], cwd=tmp_path, env=env)
    fresh = tmp_path / f"sftops-{tags['dvc.experiment']}"
    params = yaml.safe_load((fresh / "params.yaml").read_text())
    curated, model = fresh / params["paths"]["curated"], fresh / params["paths"]["model"]
    assert dvc_md5(curated) == tags["dvc.curated_md5"] and dvc_md5(model) == tags["dvc.model_md5"]
    for name in ("train.parquet", "test.parquet"):
        assert (curated / name).read_bytes() == (stack.clone / params["paths"]["curated"] / name).read_bytes()
    run_info = json.loads((model / "run.json").read_text())
    assert run_info["run_id"] == champion.run_id and run_info["version"] == champion.version
    assert json.loads(dvc(env, fresh, "status", "--json")) == {}


def test_sftops_reproduce_restores_the_recorded_data_through_dvc_and_retrains_the_same_model(stack, tmp_path):
    """From the team's checkout (which has neither the experiment's commit nor its data): the commit is fetched by
    the version's ref, the curated data pulled from the DVC remote, train and evaluate re-run; nothing re-ingests."""
    env = {**realstack.tool_env(), "MLFLOW_TRACKING_URI": stack.mlflow}
    again = tmp_path / "again"
    sh(
        sys.executable,
        "-m",
        "sftops",
        "reproduce",
        f"models:/{MODEL_NAME}@champion",
        "--into",
        str(again),
        cwd=stack.repo,
        env=env,
    )
    result = json.loads((again / "reproduction.json").read_text())
    assert result["data_restored_by_dvc"] and result["reproduced"], result["failed"]
    assert result["checks"]["curated_files"]["match"] and result["checks"]["model_files"]["match"]
    log = (again / "reproduction.log").read_text()
    assert "dvc pull data/curated" in log and "Running stage 'train'" in log and "Running stage 'ingest'" not in log


def test_a_pushed_train_param_change_reruns_train_and_evaluate_and_the_run_cache_restores_the_old_params(stack):
    before = {r.info.run_id for r in mlflow_runs(stack.mlflow)}
    push_change(stack, "lr 0.001", lambda p: p["train"].update(learning_rate=0.001))
    changed = completed(stack.api, trigger(stack.env, stack.repo, "sft-pipeline/nightly"))
    states = task_states(stack.api, changed["id"])
    assert states["ingest"] in {"Restored", "Up to date"} and states["format"] in {"Restored", "Up to date"}
    assert states["train"] == "Ran" and states["evaluate"] == "Ran"
    runs = {r.info.run_id: r for r in mlflow_runs(stack.mlflow)}
    [new] = set(runs) - before
    assert runs[new].data.params["train.learning_rate"] == "0.001"

    # Back to the first params: DVC's run-cache checks the first run's outputs out; nothing trains.
    push_change(stack, "lr back", lambda p: p["train"].update(learning_rate=0.003))
    again = completed(stack.api, trigger(stack.env, stack.repo, "sft-pipeline/nightly"))
    assert task_states(stack.api, again["id"])["train"] == "Restored"
    assert task_states(stack.api, again["id"])["evaluate"] == "Restored"
    assert {r.info.run_id for r in mlflow_runs(stack.mlflow)} == set(runs)  # no new MLflow run: no training
    first_version = MlflowClient(stack.mlflow).get_model_version(MODEL_NAME, "1")
    assert json.loads((stack.clone / "models/run.json").read_text())["run_id"] == first_version.run_id


RATES = ("0.002", "0.004")


def test_variants_run_at_once_as_dvc_experiments_into_the_one_registry(stack):
    ids = [trigger(stack.env, stack.repo, "sft-pipeline/sweep", overrides=[f"train.learning_rate={r}"]) for r in RATES]
    first, second = [completed(stack.api, i) for i in ids]
    assert first["start_time"] < second["end_time"] and second["start_time"] < first["end_time"]  # they overlapped
    env = realstack.tool_env()
    shown = json.loads(dvc(env, stack.clone, "exp", "show", "--json"))
    experiments = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                lr = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("train", {}).get("learning_rate")
                metrics = data.get("metrics", {}).get("metrics.json", {}).get("data", {})
                experiments[rev.get("name")] = (lr, metrics.get("tuned", {}).get("nll"))
    swept = {lr: nll for lr, nll in experiments.values() if lr in (0.002, 0.004)}
    assert set(swept) == {0.002, 0.004} and all(nll is not None for nll in swept.values()), experiments
    client = MlflowClient(stack.mlflow)
    for flow_run in (first, second):
        assert task_states(stack.api, flow_run["id"])["record"] == "Recorded"
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    rates = sorted(client.get_run(v.run_id).data.params["train.learning_rate"] for v in versions)
    assert set(RATES) <= set(rates)
    for version in versions:
        if client.get_run(version.run_id).data.params["train.learning_rate"] in RATES:
            assert version.tags["data.versioned"] == "true" and version.tags["dvc.experiment"] in experiments
            assert version.tags["promotion.decision"] in {"champion", "challenger"}


def test_dvc_repro_the_flow_by_hand_and_the_deployment_write_the_same_dvc_lock(stack, tmp_path):
    """Same commit, same params: the three doors record the same stages, deps, params and outputs. The model and
    reports folders differ only in run.json (the MLflow run id) and report.html (which names it)."""
    env = realstack.tool_env()
    commit = sh("git", "rev-parse", "HEAD", cwd=stack.repo).strip()
    by_door = {}
    for door in ("dvc repro", "flow by hand"):
        folder = tmp_path / door.replace(" ", "-")
        sh("git", "clone", "-q", str(stack.origin), str(folder), cwd=tmp_path)
        sh("git", "checkout", "-q", commit, cwd=folder)
        if door == "dvc repro":
            dvc({**env, "MLFLOW_TRACKING_URI": stack.mlflow}, folder, "repro")
        else:
            sh(
                sys.executable,
                "flows/sft_pipeline.py",
                cwd=folder,
                env={**stack.env, "SFTOPS_DEPLOY_DIR": str(tmp_path)},
            )
        by_door[door] = (folder, yaml.safe_load((folder / "dvc.lock").read_text())["stages"])
    # The deployment's door: the first nightly run, on these params too (the change test, if it ran, went back).
    first = json.loads((stack.clone / "models/run.json").read_text())["version"]  # the version the runs recorded
    ref = MlflowClient(stack.mlflow).get_model_version(MODEL_NAME, first).tags["git.ref"]
    by_door["deployment"] = (
        stack.clone,
        yaml.safe_load(sh("git", "show", f"{ref}:dvc.lock", cwd=stack.clone))["stages"],
    )

    def comparable(folder: Path, stages: dict) -> dict:
        out = {}
        for name, entry in stages.items():
            deps = {d["path"]: listing(folder, d["md5"]) for d in entry["deps"]}
            outs = {o["path"]: listing(folder, o["md5"]) for o in entry["outs"]}
            out[name] = {"cmd": entry["cmd"], "deps": deps, "params": entry.get("params"), "outs": outs}
        return out

    views = {door: comparable(*found) for door, found in by_door.items()}
    assert views["dvc repro"] == views["flow by hand"] == views["deployment"]


def listing(folder: Path, md5: str) -> dict[str, str] | str:
    """A directory's files and their md5 (from DVC's cache), less the files that name the MLflow run."""
    if not md5.endswith(".dir") or not (folder / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).exists():
        return md5  # a file, or a source folder (its listing is not cached; its hash is compared as is)
    entries = json.loads((folder / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).read_text())
    return {e["relpath"]: e["md5"] for e in entries if e["relpath"] not in {"run.json", "report.html"}}
