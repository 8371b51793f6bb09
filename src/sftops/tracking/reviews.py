"""A reviewer's verdict on a registered version, and what the registry says about reviews: the versions that
passed the automatic gate and wait for a verdict, and a `champion` alias the gate did not set (moved by hand in the
UI or through the API onto a version the gate refused, or onto a rejected one). The verdict's tags are named in
review_state.py; the promote step reads them (registry.promote)."""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient

from sftops.errors import ConfigError
from sftops.evaluate.promotion import CHAMPION
from sftops.redact import redact
from sftops.tracking.registry import DECISION, DECISION_REASON, GATE
from sftops.tracking.review_state import (
    PENDING,
    REJECTED,
    REVIEW,
    REVIEW_BY,
    REVIEW_REASON,
    VERDICTS,
    review_state,
    reviewed_by,
)


def reviewer() -> str:
    """Who this client reviews as: the user it authenticates as on a tracking server (MLFLOW_TRACKING_USERNAME),
    else this machine's user; a server running sftops' review app checks it (tracking/review_server.py), a local
    store cannot."""
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


def refused(exc: mlflow.exceptions.MlflowException) -> bool:
    """Whether the tracking server refused the request for its user (401, 403), as opposed to failing it."""
    return exc.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or any(
        f"error code {code} " in str(exc) for code in (401, 403)
    )


def set_verdict(store: str, name: str, version: str, verdict: str, reason: str) -> dict[str, str]:
    """Tag version `version` of `name` with a reviewer's verdict (approved or rejected), who gave it and why; returns
    the version's tags as the registry then holds them. `review` is set last: it is what the gate and the
    registry's webhook act on, and its reason and reviewer are in place by then."""
    if verdict not in VERDICTS:
        raise ConfigError(f"review verdict {verdict!r}: must be one of {', '.join(VERDICTS)}")
    client, who = MlflowClient(store), reviewer()
    try:
        for key, value in ((REVIEW_BY, who), (REVIEW_REASON, reason), (REVIEW, verdict)):
            client.set_model_version_tag(name, version, key, value)
    except mlflow.exceptions.MlflowException as exc:
        if not refused(exc):
            raise
        raise ConfigError(
            f"models:/{name}/{version}: {redact(store)} refused to record {who}'s verdict: a reviewer needs EDIT on "
            f"registered model {name!r} (an admin grants it: docs/review.md#who-may-decide)"
        ) from None
    return dict(client.get_model_version(name, version).tags)


@dataclass(frozen=True)
class Awaiting:
    """A version that passed the automatic gate and has no verdict yet, with what the promote step decided."""

    version: str
    decision: str
    reason: str


def passed_gate(tags: dict[str, str]) -> bool:
    """Whether the promote step's automatic gate passed the version (a version promoted before the gate recorded
    that passed it if it became champion)."""
    return tags.get(GATE) == "passed" or (GATE not in tags and tags.get(DECISION) == CHAMPION)


def awaiting_review(store: str, name: str) -> list[Awaiting]:
    """The versions of `name` that passed the gate and wait for a verdict, newest first."""
    versions = MlflowClient(store).search_model_versions(f"name = '{name}'")
    waiting = [v for v in versions if passed_gate(v.tags) and review_state(v.tags) == PENDING]
    return [
        Awaiting(str(v.version), v.tags.get(DECISION, "?"), v.tags.get(DECISION_REASON, ""))
        for v in sorted(waiting, key=lambda v: int(v.version), reverse=True)
    ]


def champion_check(store: str, name: str) -> str | None:
    """Why the `champion` alias points where the gate would not have put it (a rejected version; a version whose
    recorded decision is not champion, or that the gate never decided: set by hand); None when the gate set it, or
    there is no champion."""
    client = MlflowClient(store)
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None
    tags, at = version.tags, f"{CHAMPION} -> v{version.version}"
    if review_state(tags) == REJECTED:
        return f"{at}: a version rejected in review {reviewed_by(tags)}"
    if DECISION not in tags:
        return f"{at}: set by hand on a version the gate never decided"
    if tags[DECISION] != CHAMPION:
        return f"{at}: set by hand on a version the gate refused ({tags[DECISION]}: {tags.get(DECISION_REASON, '')})"
    return None
