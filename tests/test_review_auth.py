"""Only reviewers decide, and the verdict records who gave it: a real `mlflow server --app-name sftops-review`
(MLflow's basic-auth app with sftops' review hooks, tracking/review_server.py) on loopback, with a SQLite store and
its own user database. A user with READ on the registered model cannot approve or reject (403, through the CLI and
the REST API); a reviewer with EDIT can, and `review.by` is the user the server authenticated, whoever the client
claims to be, through the REST API and the UI's ajax-api alike."""

from __future__ import annotations

import secrets

import mlflow
import pytest
import requests
from mlflow import MlflowClient
from mlflow.server import get_app_client

from conftest import error_lines
from realstack import MlflowServer
from sftops.cli import main
from sftops.tracking.review_state import REVIEW, REVIEW_BY, REVIEW_REASON

ADMIN, READER, REVIEWER, CAROL = "admin", "reader", "reviewer", "carol"


@pytest.fixture
def auth_server(tmp_path, monkeypatch):
    """The review app on loopback: (url, passwords by user). Users get READ by default; REVIEWER and CAROL have EDIT
    on the registered model `tiny`, which has one version."""
    passwords = {user: secrets.token_urlsafe(16) for user in (ADMIN, READER, REVIEWER, CAROL)}
    ini = tmp_path / "auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
        f"admin_username = {ADMIN}\nadmin_password = {passwords[ADMIN]}\n"
        "auth_cache_ttl_seconds = 600\n"  # a password hash checked once per user, not on every request
    )
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(16))
    server = MlflowServer(tmp_path / "server")
    server.cmd += ["--app-name", "sftops-review"]
    server.start()
    try:
        login(monkeypatch, ADMIN, passwords)
        users = get_app_client("basic-auth", tracking_uri=server.url)
        for user in (READER, REVIEWER, CAROL):
            users.create_user(user, passwords[user])
        client = MlflowClient(server.url)
        run = client.create_run(client.create_experiment("review"))
        client.create_registered_model("tiny")
        client.create_model_version("tiny", f"{run.info.artifact_uri}/model", run.info.run_id)
        for user in (REVIEWER, CAROL):
            users.grant_user_permission(user, "registered_model", "tiny", "EDIT")
        yield server.url, passwords
    finally:
        server.stop()


def login(monkeypatch, user: str, passwords: dict[str, str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", passwords[user])


def review_tags(url: str, monkeypatch, passwords) -> dict[str, str]:
    login(monkeypatch, ADMIN, passwords)
    tags = MlflowClient(url).get_model_version("tiny", "1").tags
    return {k: v for k, v in tags.items() if k in (REVIEW, REVIEW_BY, REVIEW_REASON)}


def cli_as(user: str, url: str, passwords, monkeypatch, *args: str) -> int:
    """`sftops review ARGS` as `user` against the server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    login(monkeypatch, user, passwords)
    return main(["review", *args])


def set_tag(url: str, user: str, passwords, key: str, value: str, api: str = "api") -> requests.Response:
    return requests.post(
        f"{url}/{api}/2.0/mlflow/model-versions/set-tag",
        json={"name": "tiny", "version": "1", "key": key, "value": value},
        auth=(user, passwords[user]),
        timeout=30,
    )


def test_only_a_reviewer_decides_and_the_server_records_who(auth_server, monkeypatch, capsys):
    url, passwords = auth_server

    # READ on the model: may look, may not decide (the CLI says so in one line; the REST API answers 403).
    assert cli_as(READER, url, passwords, monkeypatch, "approve", "models:/tiny/1", "--reason", "looks fine") == 2
    assert error_lines(capsys.readouterr().err) == [
        f"sftops: models:/tiny/1: {url} refused to record {READER}'s verdict: a reviewer needs EDIT on registered "
        "model 'tiny' (an admin grants it: docs/review.md#who-may-decide)"
    ]
    assert set_tag(url, READER, passwords, REVIEW, "approved").status_code == 403
    assert review_tags(url, monkeypatch, passwords) == {}

    # EDIT on the model: a reviewer approves; the verdict names the authenticated user.
    assert (
        cli_as(REVIEWER, url, passwords, monkeypatch, "approve", "models:/tiny/1", "--reason", "answers read fine") == 0
    )
    assert capsys.readouterr().out.startswith(f"models:/tiny/1: approved by {REVIEWER} (answers read fine)")
    assert review_tags(url, monkeypatch, passwords) == {
        REVIEW: "approved",
        REVIEW_BY: REVIEWER,
        REVIEW_REASON: "answers read fine",
    }

    # Nobody writes review.by for someone else, not even an admin: the server refuses, the tag stays.
    for user in (REVIEWER, ADMIN):
        login(monkeypatch, user, passwords)
        with pytest.raises(mlflow.exceptions.MlflowException, match="review.by is the user who sets review"):
            MlflowClient(url).set_model_version_tag("tiny", "1", REVIEW_BY, CAROL)
    assert review_tags(url, monkeypatch, passwords)[REVIEW_BY] == REVIEWER

    # Another reviewer rejects from the UI (its ajax-api sets `review` alone): the server stamps who.
    assert set_tag(url, CAROL, passwords, REVIEW, "rejected", api="ajax-api").status_code == 200
    assert review_tags(url, monkeypatch, passwords)[REVIEW_BY] == CAROL
    assert review_tags(url, monkeypatch, passwords)[REVIEW] == "rejected"

    # A value that is no verdict is refused, and changes neither the verdict nor its author.
    assert set_tag(url, REVIEWER, passwords, REVIEW, "maybe").status_code == 400
    assert review_tags(url, monkeypatch, passwords)[REVIEW] == "rejected"
    assert review_tags(url, monkeypatch, passwords)[REVIEW_BY] == CAROL

    # A version cannot be registered already reviewed.
    login(monkeypatch, REVIEWER, passwords)
    client = MlflowClient(url)
    source = client.get_model_version("tiny", "1")
    with pytest.raises(mlflow.exceptions.MlflowException, match="register the version first"):
        client.create_model_version("tiny", source.source, source.run_id, tags={REVIEW: "approved"})

    # Deleting the verdict (MANAGE: the admin) makes the version pending again, with no author or reason left.
    login(monkeypatch, ADMIN, passwords)
    MlflowClient(url).delete_model_version_tag("tiny", "1", REVIEW)
    assert review_tags(url, monkeypatch, passwords) == {}
