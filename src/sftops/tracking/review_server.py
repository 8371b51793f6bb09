"""sftops' review app for `mlflow server --app-name sftops-review`: MLflow's basic-auth app (users, per-model
permissions: a reviewer needs EDIT on the registered model to set a version's tags) that keeps the review tags
honest, since MLflow records no author of a tag. When a version's `review` tag is set, through the REST API or
the UI's ajax-api alike, the server stamps `review.by` with the authenticated user; a write of `review.by` naming
anyone else is refused, as is a `review` that is no verdict, and a version registered with review tags already.
Deleting `review` (pending again; deleting a tag needs MANAGE) deletes `review.by` and `review.reason` with it.
The hooks run after basic-auth's, so the user is authenticated and allowed to update the version by then.
Imported by the server only (mlflow's `mlflow.app` entry point, pyproject.toml)."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, g, jsonify, request
from mlflow.entities.model_registry import ModelVersionTag
from mlflow.server import app as mlflow_app
from mlflow.server.auth import authenticate_request
from mlflow.server.auth import create_app as basic_auth_app
from mlflow.server.handlers import _get_model_registry_store

from sftops.tracking.review_state import REVIEW, REVIEW_BY, REVIEW_REASON, VERDICTS

SET_TAG, DELETE_TAG = "/mlflow/model-versions/set-tag", "/mlflow/model-versions/delete-tag"
CREATE_VERSION = "/mlflow/model-versions/create"
UNSET = object()  # review.by absent before the server stamped it


def create_app(app: Flask = mlflow_app) -> Any:
    """The basic-auth app with the review hooks (a Flask app, or the FastAPI app wrapping it under uvicorn)."""
    served = basic_auth_app(app)
    app.before_request(review_before_request)
    app.after_request(review_after_request)
    return served


def _route(suffix: str, method: str) -> bool:
    return request.method == method and request.path.endswith(f"/2.0{suffix}")  # /api/2.0 and /ajax-api/2.0


def _params() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True) if request.method != "GET" else None
    return body if isinstance(body, dict) else dict(request.args)


def _user() -> str:
    return getattr(g, "mlflow_authenticated_user", None) or authenticate_request().username


def _refuse(status: int, code: str, message: str) -> Response:
    response = jsonify({"error_code": code, "message": message})
    response.status_code = status
    return response


def review_before_request() -> Response | None:
    if _route(CREATE_VERSION, "POST"):
        keys = {t.get("key") for t in _params().get("tags") or [] if isinstance(t, dict)}
        if keys & {REVIEW, REVIEW_BY}:
            return _refuse(400, "INVALID_PARAMETER_VALUE", "register the version first, then review it (tag review)")
        return None
    if not (_route(SET_TAG, "POST") or _route(DELETE_TAG, "DELETE")):
        return None
    params, user = _params(), _user()
    key, value = params.get("key"), params.get("value")
    if key == REVIEW_BY and not (request.method == "POST" and value == user):
        return _refuse(
            403,
            "PERMISSION_DENIED",
            f"{REVIEW_BY} is the user who sets {REVIEW}: the server records it ({user} may set only {user})",
        )
    if key == REVIEW and request.method == "POST":
        if value not in VERDICTS:
            return _refuse(400, "INVALID_PARAMETER_VALUE", f"{REVIEW} must be one of {', '.join(VERDICTS)}")
        _stamp(params["name"], str(params["version"]), user)
    return None


def _stamp(name: str, version: str, user: str) -> None:
    """review.by := the user, before `review` is written: whoever reads the verdict finds its author. The value it
    replaces is kept, to put back if the verdict is not written after all."""
    store = _get_model_registry_store()
    try:
        g.review_by_before = store.get_model_version(name, version).tags.get(REVIEW_BY, UNSET)
        store.set_model_version_tag(name, version, ModelVersionTag(REVIEW_BY, user))
    except Exception:  # noqa: BLE001 - no such version: the handler answers with MLflow's own error
        g.pop("review_by_before", None)


def review_after_request(response: Response) -> Response:
    before = g.pop("review_by_before", None)
    if response.status_code == 200 and _route(DELETE_TAG, "DELETE") and _params().get("key") == REVIEW:
        _delete(_params(), (REVIEW_BY, REVIEW_REASON))  # pending again: no author, no reason
    elif before is not None and response.status_code != 200:  # the verdict was not written: nor is its author
        if before is UNSET:
            _delete(_params(), (REVIEW_BY,))
        else:
            params = _params()
            _get_model_registry_store().set_model_version_tag(
                params["name"], str(params["version"]), ModelVersionTag(REVIEW_BY, before)
            )
    return response


def _delete(params: dict[str, Any], keys: tuple[str, ...]) -> None:
    store = _get_model_registry_store()
    for key in keys:
        try:
            store.delete_model_version_tag(params["name"], str(params["version"]), key)
        except Exception:  # noqa: BLE001 - the tag was not there
            pass
