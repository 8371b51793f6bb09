"""Where runs go, and whether the tracking server answered."""

from __future__ import annotations

import functools
import os
import time
from typing import Any
from urllib.parse import urlsplit

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
    store = here if redact(here) == run_info["tracking_uri"] else run_info["tracking_uri"]
    return answering(store)


SERVED = ("", "file", "sqlite", "http", "https", "databricks")  # stores MLflow reaches without a database server


def shared(uri: str) -> bool:
    """Whether a tracking URI is a store other machines read too: a tracking server (http(s), Databricks) or a
    database server. A SQLite file or a folder is this machine's."""
    scheme = urlsplit(uri).scheme.split("+")[0]
    return scheme in ("http", "https", "databricks") or scheme not in SERVED


@functools.cache  # once per process and store: a store that answered is not asked again
def answering(uri: str, tries: int = 3, wait_s: float = 1.0) -> str:
    """`uri`, once a database store (PostgreSQL, MySQL) has accepted a connection. MLflow's own engine set-up
    tries ten times with growing waits, about 100 s, before a store that is down fails; this says so within
    seconds, and the orchestrator's retries (not a stage that hangs) ride out an outage."""
    if urlsplit(uri).scheme.split("+")[0] in SERVED:
        return uri
    import sqlalchemy

    timeout = {"connect_timeout": 10} if uri.startswith("postgresql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=timeout, poolclass=sqlalchemy.pool.NullPool)
    except ImportError:  # no driver for this URI here: MLflow says so in its own words
        return uri
    for attempt in range(tries):
        try:
            engine.connect().close()
            return uri
        except sqlalchemy.exc.OperationalError:
            if attempt == tries - 1:
                raise
            time.sleep(wait_s)
    return uri


def unreachable(exc: BaseException) -> bool:
    """Whether an error means the tracking server (or a database store) did not answer, as opposed to a refused
    request."""
    import mlflow
    import requests
    import sqlalchemy.exc

    if isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError, sqlalchemy.exc.OperationalError)):
        return True
    return isinstance(exc, mlflow.exceptions.MlflowException) and "API request to" in str(exc) and not refused(exc)


def refused(exc: BaseException) -> bool:
    """Whether the tracking server answered, refusing the request for its user (401, 403: a permission the user
    lacks on a server with authentication), rather than failing it."""
    import mlflow

    return isinstance(exc, mlflow.exceptions.MlflowException) and (
        exc.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED")
        or any(f"error code {code} " in str(exc) for code in (401, 403))
    )
