"""The reviewers' feedback on a registered version's answers, read from MLflow: the version's answer traces (all
its evaluations: tracking/traces.py) with their `preference` assessments, summed up (evaluate/preference.py), and
the prompts where the tuned answer lost, for a hard-cases suite (evaluate/hard_cases.py)."""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient

from sftops.config import EvaluateConfig
from sftops.errors import ConfigError
from sftops.evaluate.preference import LabelledRow, summarize
from sftops.redact import redact
from sftops.tracking.evaluations import model_id
from sftops.tracking.store import store_of
from sftops.tracking.traces import labelled_rows


def version_rows(store: str, name: str, version: str) -> list[LabelledRow]:
    """The answer traces of the version's evaluations, newest first, with their reviewers' preferences."""
    found = model_id(MlflowClient(store), name, version)
    if found is None:
        raise ConfigError(f"models:/{name}/{version} has no logged model in {redact(store)}: nothing was evaluated")
    return labelled_rows(store, found)


def version_summary(store: str, name: str, version: str, e: EvaluateConfig) -> dict[str, Any]:
    """The reviewers' preferences on the version's answers: rows labelled, the win rate with its bootstrap
    interval (evaluate's resamples, seed and confidence), the rows where tuned lost."""
    summary = summarize(version_rows(store, name, version), e.bootstrap_resamples, e.bootstrap_seed, e.confidence)
    return {"model": f"models:/{name}/{version}", **summary}


def labels_so_far(run_info: dict[str, Any], e: EvaluateConfig) -> dict[str, Any] | None:
    """For the report: the reviewers' preferences on the version's answers from its earlier evaluations (a version
    evaluated again after review), None while none is labelled."""
    name, version = run_info.get("registered_model"), run_info.get("version")
    if not name or version is None:
        return None
    try:
        found = version_summary(store_of(run_info), name, str(version), e)
    except ConfigError:  # nothing evaluated yet: no logged model to hold labels
        return None
    return found if found["labelled"] else None
