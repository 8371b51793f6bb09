"""Where runs go, and whether the tracking server answered."""

from __future__ import annotations

import os
from typing import Any

from sftops.redact import redact, tracking_credentials
from sftops.workspace import project_root


def default_tracking_uri() -> str:
    """mlflow.db in the project folder, as an absolute path: a DVC experiment's stages log to the project's store,
    not to a file in its temporary workspace (see workspace.py)."""
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    """Where runs go is the environment's business (a team server, a local file), not the params'. A password in
    an http(s) URI is handed to MLflow's credential variables, so the URI MLflow prints and records has none."""
    return tracking_credentials(os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())


def store_of(run_info: dict[str, Any]) -> str:
    """The tracking URI of a recorded run: run.json keeps it redacted, so the environment's, when it is that one."""
    here = tracking_uri()
    return here if redact(here) == run_info["tracking_uri"] else run_info["tracking_uri"]


def unreachable(exc: BaseException) -> bool:
    """Whether an error means the tracking server (or a database store) did not answer, as opposed to a refused
    request."""
    import mlflow
    import requests
    import sqlalchemy.exc

    if isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError, sqlalchemy.exc.OperationalError)):
        return True
    return isinstance(exc, mlflow.exceptions.MlflowException) and "API request to" in str(exc)
