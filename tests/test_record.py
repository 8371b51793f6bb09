"""Where the flow records a run, and what its registered version promises about it. A newcomer's clone pushes
nothing: the run is recorded in the clone's own git refs and DVC cache, the version says it can be restored
there only and how, and that command works as written; a run in which DVC found nothing new points at the
record it already has. (Pushed records, restored on a fresh clone anywhere: tests/test_operations.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow import MlflowClient

from realstack import empty_mlflow_store, git_commit, make_repo, sh, tool_env
from sftops.provenance.manifest import dvc_md5
from sftops.tracking.registry import versioning
from sftops.tracking.tags import ANYWHERE, RESTORABLE, THIS_MACHINE, VERSIONED, VERSIONED_REASON

MODEL_NAME = "record-sft"


def run_flow(clone: Path, env: dict[str, str]) -> tuple[str, dict]:
    """`.venv/bin/python flows/sft_pipeline.py`, the environment not activated; returns its log and models/run.json."""
    proc = subprocess.run(
        [sys.executable, "flows/sft_pipeline.py"], cwd=clone, env=env, capture_output=True, text=True, timeout=900
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log, json.loads((clone / "models/run.json").read_text())


def refs(repo: Path, prefix: str = "") -> list[str]:
    return sh(
        "git", "for-each-ref", "--format=%(refname) %(objectname)", *([prefix] if prefix else []), cwd=repo
    ).split("\n")


def test_a_clone_records_on_its_machine_pushes_nothing_and_a_run_with_nothing_new_points_at_that_record(
    tmp_path, stories_model, gsm8k
):
    origin, project, clone = tmp_path / "origin.git", tmp_path / "project", tmp_path / "clone"
    repo = make_repo(project, stories_model, gsm8k, rows=80, registered_model=MODEL_NAME, extra=("flows", ".dvcignore"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(max_steps=3, checkpoint_every=None)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "add", "-A", cwd=repo)
    git_commit(repo, "small params")
    sh("git", "init", "-q", "--bare", str(origin), cwd=tmp_path)
    sh("git", "symbolic-ref", "HEAD", "refs/heads/main", cwd=origin)
    sh("git", "push", "-q", str(origin), "HEAD:refs/heads/main", cwd=repo)
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)  # a newcomer's clone: `origin` is a remote
    upstream = refs(origin)
    store = empty_mlflow_store(clone / "mlflow.db")
    env = {**tool_env(), "PATH": "/usr/bin:/bin", "PREFECT_HOME": str(tmp_path / "prefect")}  # no .venv/bin
    env.pop("PREFECT_API_URL", None)

    _, first = run_flow(clone, env)
    assert refs(origin) == upstream  # the first run pushed nothing upstream
    client = MlflowClient(store)
    tags = client.get_model_version(MODEL_NAME, first["version"]).tags
    name = tags["git.ref"].rsplit("/", 1)[-1]
    assert tags[VERSIONED] == "true" and tags[RESTORABLE] == THIS_MACHINE and tags["dvc.experiment"] == name
    assert "nothing pushed (record.push_to is null)" in tags[VERSIONED_REASON]
    assert str(clone) in tags["restore.where"] and tags["restore"] == f"cd {clone} && dvc exp apply {name}"
    # a registry on this machine: a record on this machine is enough to be champion
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == str(first["version"])

    # Nothing new: every stage up to date, the same version, pointed at the same experiment; no second ref.
    experiments = refs(clone, "refs/exps")
    log, second = run_flow(clone, env)
    assert log.count("didn't change, skipping") >= 4 and "Running stage" not in log and second == first
    assert refs(clone, "refs/exps") == experiments and "the run is recorded there already" in log
    again = client.get_model_version(MODEL_NAME, first["version"]).tags
    assert (
        again["git.ref"] == tags["git.ref"]
        and again["dvc.experiment"] == name
        and again[VERSIONED_REASON].startswith("DVC found nothing new")
    )
    assert refs(origin) == upstream

    # The restore command works as written, from anywhere on this machine.
    for output in ("data/curated", "models"):
        sh("rm", "-rf", output, cwd=clone)
    sh("bash", "-c", tags["restore"], cwd=tmp_path, env=tool_env())
    assert dvc_md5(clone / "data/curated") == tags["dvc.curated_md5"]
    assert dvc_md5(clone / "models") == tags["dvc.model_md5"]


def test_a_shared_registry_counts_only_a_record_restorable_anywhere_as_versioned():
    here = {VERSIONED: "true", VERSIONED_REASON: "ref in this repository", RESTORABLE: THIS_MACHINE}
    here["restore.where"] = "the repository /srv/sftops on gpu-1"
    anywhere = {**here, RESTORABLE: ANYWHERE}
    for local in ("sqlite:////srv/sftops/mlflow.db", "file:///srv/mlruns"):
        assert versioning(here, local) == (True, "ref in this repository")
    for shared in ("http://mlflow.internal:5000", "https://u:secret@mlflow.internal", "postgresql://db/mlflow"):
        assert versioning(anywhere, shared) == (True, "ref in this repository")
        counted, why = versioning(here, shared)
        assert not counted and "restorable only in the repository /srv/sftops on gpu-1" in why
        assert "record.push_to" in why and "secret" not in why
    assert versioning({VERSIONED: "false", VERSIONED_REASON: "no git"}, "sqlite:///x.db") == (False, "no git")
