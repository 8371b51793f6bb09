"""The MLflow UI's pages a reviewer goes through, as links: the experiment in its "Model training" view, a run, a
logged model, a registered version and a run's artifact. On a tracking server (http, https) they are absolute
(without user:password@); for a store the UI is started on (`make ui` on mlflow.db) they are relative to the UI,
which is where the version's description that holds them is read."""

from __future__ import annotations

from urllib.parse import quote, urlsplit

# MLflow 3's UI opens an experiment in its GenAI view (traces, cost) unless the experiment is marked as model
# development: by this tag in the releases whose experiment page follows it, by the `workflowType` query (and the
# sidebar's "Model training" switch, kept in the browser) in those that follow the switch (3.17).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"


def ui_root(store: str) -> str:
    """The UI's address for a tracking server's URI, "" (relative links) for any other store."""
    uri = urlsplit(store)
    if uri.scheme not in {"http", "https"}:
        return ""
    return f"{uri.scheme}://{uri.hostname}" + (f":{uri.port}" if uri.port else "") + uri.path.rstrip("/") + "/"


def experiment_page(store: str, experiment_id: str) -> str:
    return f"{ui_root(store)}#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def run_page(store: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_root(store)}#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def logged_model_page(store: str, experiment_id: str, model_id: str) -> str:
    return f"{ui_root(store)}#/experiments/{experiment_id}/models/{model_id}?{TRAINING_VIEW}"


def version_page(store: str, name: str, version: str) -> str:
    return f"{ui_root(store)}#/models/{quote(name)}/versions/{version}"


def artifact(store: str, run_id: str, path: str) -> str:
    """A run's artifact as the browser opens it (the HTML report renders): the server's get-artifact."""
    return f"{ui_root(store)}get-artifact?path={quote(path)}&run_uuid={run_id}"
