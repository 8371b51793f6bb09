"""Registry events drive the pipeline, with real servers on loopback: an `mlflow server` on a SQLite store with a
webhook posting to the receiver (flows/registry_events.py), which emits Prefect events; a `prefect server start`
holding prefect.yaml's registry deployments (deployed as `make deploy` does, pinned to a commit) whose triggers
run flows/registry_flows.py on a process worker. Proved here: a version registered outside the pipeline gets
evaluated (suites included) and a version the pipeline made is left to the pipeline; an approval set through
MLflow's REST API moves the champion, a rejection does not, and a forged or replayed post is refused, logged and
starts nothing. One stack for the module: the servers and the worker start once."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient

import realstack
from conftest import QA, ROOT, formatted, qa_rows, write_jsonl, write_project
from realstack import background, free_port, git_commit, http_json, poll, prefect_env, sh

MODEL = "events"  # the registry the pipeline promotes in
LAB = "events-lab"  # a registry of another team's fine-tunes, copied into MODEL by hand
SECRET = "a-webhook-secret-for-the-tests-only"
RUN_TIMEOUT = 600  # one flow run on a busy 2-core machine: a new process, the model loaded and evaluated


@dataclass
class Stack:
    repo: Path
    mlflow: str
    api: str
    receiver: str
    receiver_log: Path
    champion: str  # the version the pipeline promoted (v1)
    outside: str  # the version copied in by hand (v2), better than v1
    lab_cfg: object


def post_tag(mlflow: str, version: str, key: str, value: str) -> None:
    """What the MLflow UI does when a reviewer sets a tag on a version: the REST API."""
    body = {"name": MODEL, "version": version, "key": key, "value": value}
    http_json("POST", f"{mlflow}/api/2.0/mlflow/model-versions/set-tag", body)


def flow_runs(api: str, flow_name: str) -> list[dict]:
    body = {"flows": {"name": {"any_": [flow_name]}}, "sort": "START_TIME_ASC"}
    return http_json("POST", f"{api}/flow_runs/filter", body)


def finished_run(api: str, flow_name: str, model_uri: str) -> dict:
    """The flow run of `flow_name` for this version, once it is final."""

    def final():
        runs = [r for r in flow_runs(api, flow_name) if r["parameters"].get("model_uri") == model_uri]
        done = [r for r in runs if r["state"] and r["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}]
        return done[0] if done else None

    run = poll(final, RUN_TIMEOUT, f"{flow_name} run for {model_uri}", interval=1)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{run_logs(api, run['id'])[-6000:]}"
    return run


def run_logs(api: str, flow_run_id: str) -> str:
    records = http_json("POST", f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
    return "\n".join(r["message"] for r in records)


def resource(version: str) -> str:
    """The Prefect resource id of a version of MODEL, as the receiver names it."""
    return f"mlflow.model-version.{MODEL}.{version}"


def prefect_events(api: str, name: str, resource_id: str) -> list[dict]:
    body = {"filter": {"event": {"name": [name]}, "resource": {"id": [resource_id]}}, "limit": 50}
    return http_json("POST", f"{api}/events/filter", body)["events"]


def at_times(run: dict) -> list[tuple[str, str]]:
    return [(key, run[key]) for key in ("created", "start_time", "end_time")]


def signed_post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **headers}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def mlflow_signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The signature as MLflow computes it (its own function, not the receiver's)."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    return _generate_hmac_signature(secret, delivery_id, timestamp, body.decode())


def tiny_project(folder: Path, tiny_model: Path, name: str, train: dict) -> object:
    """A tiny project in `folder` (params.yaml, its data, a suite), its data formatted: the pipeline's config."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    write_jsonl("in.jsonl", qa_rows(40))
    write_jsonl("suite.jsonl", qa_rows(6, [(f"{q} again", a) for q, a in QA]))
    suite = {"name": "qa-again", "path": "suite.jsonl", "informational": True}
    return formatted(
        write_project(
            tiny_model,
            [{"name": "qa", "path": "in.jsonl"}],
            train={"method": "lora", "micro_batch_size": 8, **train},
            evaluate={"num_generations": 0, "bootstrap_resamples": 200, "parity_rows": 0, "suites": [suite]},
            tracking={"registered_model_name": name},
        )
    )


def pipeline_version(cfg) -> dict:
    """The train and evaluate stages, in this process (as `dvc repro` runs them): a registered, evaluated version;
    returns its run.json."""
    from sftops.stages.evaluate import run_evaluate
    from sftops.stages.train import run_train

    record = asdict(run_train(cfg))
    return {**record, "metrics": run_evaluate(cfg).metrics}


def record_tags(mlflow: str, name: str, version: str) -> None:
    """The tags the pipeline flow's record step puts on a version whose run it pushed (restorable anywhere): on a
    shared server only such a version can be champion."""
    from sftops.tracking.tags import ANYWHERE, RESTORABLE, VERSIONED

    client = MlflowClient(mlflow)
    for key, value in {VERSIONED: "true", RESTORABLE: ANYWHERE}.items():
        client.set_model_version_tag(name, version, key, value)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    from cryptography.fernet import Fernet

    from sftops.tracking import registry

    tmp = tmp_path_factory.mktemp("events")
    here = Path.cwd()
    server_env = {
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",  # the receiver is plain http on loopback
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",  # MLflow refuses loopback and private receivers otherwise
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
    }
    with (
        pytest.MonkeyPatch.context() as env,
        realstack.mlflow_server(tmp / "mlflow", env=server_env) as mlflow_url,
        realstack.prefect_server(tmp / "prefect") as api,
    ):
        # The deployments' repository: the project, committed (what `make deploy` pins).
        repo = tmp / "repo"
        cfg = tiny_project(repo, tiny_model, MODEL, {"max_steps": 2, "learning_rate": 0.01})
        shutil.copytree(ROOT / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "prefect.yaml", repo / "prefect.yaml")
        (repo / ".gitignore").write_text("data/\nmodels/\nreports/\ncheckpoints/\nmetrics.json\n*.db\n")
        sh("git", "init", "-q", cwd=repo)
        sh("git", "add", "-A", cwd=repo)
        git_commit(repo, "the project")
        penv = prefect_env(tmp / "prefect", api_url=api)
        penv.update(MLFLOW_TRACKING_URI=mlflow_url, SFTOPS_DEPLOY_DIR=str(tmp / "deployments"))
        penv["SFTOPS_CACHE_DIR"] = os.environ["SFTOPS_CACHE_DIR"]
        penv["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), penv.get("PYTHONPATH")]))
        prefect = [sys.executable, "-m", "prefect"]
        sh(*prefect, "work-pool", "create", "sftops", "--type", "process", "--overwrite", cwd=repo, env=penv)
        sh(sys.executable, "flows/deploy.py", "--name", "on-created", "--name", "on-approved", cwd=repo, env=penv)
        port = free_port()
        receiver_url = f"http://127.0.0.1:{port}/"
        renv = {**penv, "SFTOPS_WEBHOOK_SECRET": SECRET}
        receive = [sys.executable, "flows/registry_events.py", "serve", "--port", str(port)]
        worker = [*prefect, "worker", "start", "--pool", "sftops"]
        with (
            background(receive, tmp / "receiver.log", env=renv, cwd=repo, health=f"{receiver_url}health"),
            background(worker, tmp / "worker.log", env=penv, cwd=tmp),
        ):
            # before any version exists: MLflow caches the webhooks of an event for a minute
            sh(sys.executable, "flows/registry_events.py", "register", "--url", receiver_url, cwd=repo, env=renv)
            env.setenv("MLFLOW_TRACKING_URI", mlflow_url)
            # v1: made by the pipeline, promoted; a weak fine-tune (2 steps)
            first = pipeline_version(cfg)
            record_tags(mlflow_url, MODEL, first["version"])
            assert registry.promote(first, first["metrics"], "nll", 0.0).alias == "champion"
            # another team's fine-tune (20 steps), in its own registry, copied into this one by hand
            lab_cfg = tiny_project(tmp / "lab", tiny_model, LAB, {"max_steps": 20, "learning_rate": 0.05})
            lab = pipeline_version(lab_cfg)
            os.chdir(here)
            copied = MlflowClient(mlflow_url).copy_model_version(f"models:/{LAB}/{lab['version']}", MODEL)
            record_tags(mlflow_url, MODEL, copied.version)
            yield Stack(
                repo, mlflow_url, api, receiver_url, tmp / "receiver.log", first["version"], copied.version, lab_cfg
            )
    os.chdir(here)


def test_a_version_the_pipeline_made_is_left_to_the_pipeline(stack):
    run = finished_run(stack.api, "evaluate-version", f"models:/{MODEL}/{stack.champion}")
    assert run["state"]["name"] == "Evaluated by the pipeline", run["state"]
    assert "registered by the train stage of run" in run["state"]["message"]
    client = MlflowClient(stack.mlflow)
    training_run = client.get_model_version(MODEL, stack.champion).run_id
    assert len(realstack.evaluation_runs(client, training_run)) == 1  # the pipeline's own, nothing more
    [event] = prefect_events(stack.api, "sftops.model-version.created", resource(stack.champion))
    assert event["payload"]["model_uri"] == f"models:/{MODEL}/{stack.champion}"


def test_a_version_registered_by_hand_gets_evaluated_with_its_suites(stack, tmp_path):
    from sftops.config import load_config
    from sftops.evaluate.champion import measure_model
    from sftops.tracking.evaluations import DATASET_DIGEST, LATEST
    from sftops.tracking.evaluations import MODEL as EVALUATED_MODEL
    from sftops.tracking.models import local_model_dir
    from sftops.tracking.version_evaluation import champion_split

    uri = f"models:/{MODEL}/{stack.outside}"
    run = finished_run(stack.api, "evaluate-version", uri)
    assert run["state"]["name"] == "Evaluated", run["state"]
    client = MlflowClient(stack.mlflow)
    version = client.get_model_version(MODEL, stack.outside)
    evaluations = [
        r
        for r in realstack.evaluation_runs(client, version.run_id)
        if r.data.tags.get(EVALUATED_MODEL) == f"{MODEL}/{stack.outside}"
    ]
    assert len(evaluations) == 1
    logged = evaluations[0].data.metrics
    assert "suite/qa-again/tuned_nll" in logged and "suite/qa-again/base_nll" in logged
    # On the champion's test split: the same rows the champion's evaluation scored, so the gate compares the two.
    champion_run = client.get_run(client.get_model_version(MODEL, stack.champion).run_id)
    champion_eval = client.get_run(champion_run.data.tags[LATEST])
    assert evaluations[0].data.tags[DATASET_DIGEST] == champion_eval.data.tags[DATASET_DIGEST]
    # The tuned NLL as the gate's champion measurement computes it (the model alone, from the registry).
    os.environ["MLFLOW_TRACKING_URI"] = stack.mlflow
    reference = champion_split(stack.mlflow, MODEL, stack.outside, tmp_path / "curated")
    cfg = load_config(stack.repo / "params.yaml")
    alone, _ = measure_model(cfg, local_model_dir(uri, stack.mlflow), reference.curated)
    assert logged["test_tuned_nll"] == pytest.approx(alone["tuned"]["nll"], rel=1e-5)


def forged(stack, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    return signed_post(stack.receiver, body, headers)


def test_forged_and_replayed_posts_are_refused_logged_and_start_nothing(stack):
    uri = f"models:/{MODEL}/{stack.outside}"
    approve = {
        "entity": "model_version_tag",
        "action": "set",
        "timestamp": "2026-12-08T00:00:00+00:00",
        "data": {"name": MODEL, "version": stack.outside, "key": "review", "value": "approved"},
    }
    body = json.dumps(approve).encode()
    delivery, now = str(uuid.uuid4()), str(int(time.time()))
    signed = {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": now}
    wrong = mlflow_signature("not-the-secret-but-as-long", delivery, now, body)
    stale_time = str(int(time.time()) - 3600)
    cases = {
        "unsigned": ({}, 401),
        "wrong secret": ({**signed, "X-MLflow-Signature": wrong}, 403),
        "body changed": (
            {
                "X-MLflow-Delivery-Id": delivery,
                "X-MLflow-Timestamp": now,
                "X-MLflow-Signature": mlflow_signature(SECRET, delivery, now, body.replace(b"approved", b"rejected")),
            },
            403,
        ),
        "stale": (
            {
                "X-MLflow-Delivery-Id": delivery,
                "X-MLflow-Timestamp": stale_time,
                "X-MLflow-Signature": mlflow_signature(SECRET, delivery, stale_time, body),
            },
            403,
        ),
    }
    for case, (headers, expected) in cases.items():
        status, answer = forged(stack, body, headers)
        assert status == expected, (case, status, answer)
    log = stack.receiver_log.read_text()
    assert log.count("refused a post from 127.0.0.1") >= len(cases)
    # A post MLflow really signed, sent twice: the second is a replay. The first (a harmless tag) starts nothing.
    tag = {**approve, "data": {**approve["data"], "key": "note", "value": "looked at it"}}
    body = json.dumps(tag).encode()
    delivery = str(uuid.uuid4())
    headers = {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": now}
    headers["X-MLflow-Signature"] = mlflow_signature(SECRET, delivery, now, body)
    assert forged(stack, body, headers) == (200, {"event": None})
    assert forged(stack, body, headers)[0] == 409
    assert prefect_events(stack.api, "sftops.model-version.approved", resource(stack.outside)) == []
    assert not [r for r in flow_runs(stack.api, "promote-version") if r["parameters"]["model_uri"] == uri]
    assert str(MlflowClient(stack.mlflow).get_model_version_by_alias(MODEL, "champion").version) == stack.champion


def test_a_rejection_starts_nothing_and_an_approval_moves_the_champion(stack):
    """Set through MLflow's REST API, as the UI sets it. The rejection is in Prefect (its event) and starts no
    promotion; the approval's promotion is the only one, and moves the alias. Prints the time from the approval
    in the registry to the alias moving."""
    uri = f"models:/{MODEL}/{stack.outside}"
    finished_run(stack.api, "evaluate-version", uri)  # evaluated first: the gate needs its result
    client = MlflowClient(stack.mlflow)
    post_tag(stack.mlflow, stack.outside, "review", "rejected")
    rejected = "sftops.model-version.rejected"
    poll(lambda: prefect_events(stack.api, rejected, resource(stack.outside)), 120, "the rejection in Prefect")
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == stack.champion

    approved_at = time.monotonic()
    post_tag(stack.mlflow, stack.outside, "review", "approved")

    def moved() -> bool:
        return str(client.get_model_version_by_alias(MODEL, "champion").version) == stack.outside

    poll(moved, RUN_TIMEOUT, "the champion alias moving to the approved version", interval=0.5)
    seconds = time.monotonic() - approved_at
    runs = [r for r in flow_runs(stack.api, "promote-version") if r["parameters"]["model_uri"] == uri]
    assert len(runs) == 1  # the approval's; the rejection (its event came first) started none
    run = finished_run(stack.api, "promote-version", uri)
    [event] = prefect_events(stack.api, "sftops.model-version.approved", resource(stack.outside))
    at = {k: datetime.fromisoformat(v) for k, v in (("event", event["occurred"]), *at_times(run))}
    print(
        f"approval in the registry -> champion alias moved: {seconds:.1f} s (loopback, a process worker); "
        f"event -> flow run created {(at['created'] - at['event']).total_seconds():.1f} s, -> started "
        f"{(at['start_time'] - at['event']).total_seconds():.1f} s, -> flow run ended "
        f"{(at['end_time'] - at['event']).total_seconds():.1f} s"
    )
    assert client.get_model_version(MODEL, stack.outside).tags["promotion.decision"] == "champion"


def test_the_receiver_accepts_what_mlflow_signs_and_starts_flows_only_on_a_new_version_or_a_verdict():
    """The receiver's checks on their own (milliseconds): a post signed by MLflow's own function passes, any change
    to it does not; only a created version and a review verdict become Prefect events."""
    sys.path.insert(0, str(ROOT / "flows"))
    import registry_events as receiver

    body, delivery, now = b'{"entity": "model_version"}', str(uuid.uuid4()), time.time()
    stamp = str(int(now))
    headers = {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": stamp}
    headers["X-MLflow-Signature"] = mlflow_signature(SECRET, delivery, stamp, body)
    assert receiver.refusal(headers, body, SECRET, now, 300) is None
    assert receiver.refusal(headers, body + b" ", SECRET, now, 300)[0] == 403
    assert receiver.refusal({**headers, "X-MLflow-Delivery-Id": str(uuid.uuid4())}, body, SECRET, now, 300)[0] == 403
    assert receiver.refusal(headers, body, SECRET, now + 301, 300)[0] == 403  # stale
    assert receiver.refusal(headers, body, "another-secret-of-some-length", now, 300)[0] == 403
    assert receiver.refusal({}, body, SECRET, now, 300)[0] == 401

    def event(entity: str, action: str, **data) -> str | None:
        delivered = {"entity": entity, "action": action, "data": {"name": "m", "version": "3", **data}}
        found = receiver.prefect_event(delivered)
        return found and found["event"]

    assert event("model_version", "created", source="models:/m-1", run_id="r") == "sftops.model-version.created"
    assert event("model_version_tag", "set", key="review", value="approved") == "sftops.model-version.approved"
    assert event("model_version_tag", "set", key="review", value="rejected") == "sftops.model-version.rejected"
    assert event("model_version_tag", "set", key="review", value="maybe") is None
    assert event("model_version_tag", "set", key="review.reason", value="approved") is None
    assert event("model_version_alias", "created", alias="champion") is None
    created = {"entity": "model_version", "action": "created", "data": {"name": "m", "version": "3"}}
    found = receiver.prefect_event(created)
    assert found["resource"]["prefect.resource.id"] == "mlflow.model-version.m.3"
    assert found["payload"]["model_uri"] == "models:/m/3"
