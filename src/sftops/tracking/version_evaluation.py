"""What the registry knows about a version's evaluation, for a version the pipeline did not make: whether it has
one, whether the pipeline's own evaluate stage will give it one, and the test split to evaluate it on (the
champion's, so the gate compares the two on the same rows). The measuring itself is the evaluate stage's
(stages/evaluate.py evaluate_version)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from sftops.errors import ConfigError
from sftops.evaluate.promotion import CHAMPION
from sftops.layout import STATS
from sftops.tracking.evaluations import LATEST, MODEL, TEST_SPLIT_ARTIFACT, dataset_source
from sftops.tracking.runs import load_manifest


@dataclass(frozen=True)
class Reference:
    """The test split a version is evaluated on: a curated folder holding it, where it came from."""

    curated: Path
    source: str  # the dataset source the evaluation links (the champion's evaluation's)
    evaluation_run_id: str  # the evaluation run it was taken from


def parse_version(model_uri: str) -> tuple[str, str]:
    """NAME and VERSION of models:/NAME/VERSION."""
    name, _, version = model_uri.removeprefix("models:/").partition("/")
    if not model_uri.startswith("models:/") or not name or not version.strip("/").isdigit():
        raise ConfigError(f"{model_uri!r} is not models:/NAME/VERSION (a registered version, by number)")
    return name, version.strip("/")


def evaluations_of(store: str, name: str, version: str) -> list[str]:
    """The evaluation runs logged for this version (tag sftops.evaluation.model = NAME/VERSION), newest first."""
    client = MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(
        experiments, f"tags.`{MODEL}` = '{name}/{version}'", order_by=["attributes.start_time DESC"]
    )
    return [r.info.run_id for r in found]


def pipeline_run_of(store: str, name: str, version: str, wait_s: float = 120.0) -> str | None:
    """The training run that registered this version in the pipeline's train stage (whose evaluate stage then
    evaluates it), or None for a version registered any other way. The train stage names the version in its run's
    manifest right after registering it, before the run ends: a run still open is waited for (up to wait_s)."""
    client = MlflowClient(store)
    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            model = load_manifest(run_id, store).get("model") or {}
        except ConfigError:
            return None  # no manifest: not a run of sftops' train stage
        if model.get("registered_model") == name and str(model.get("version")) == version:
            return run_id
        if client.get_run(run_id).info.status != "RUNNING" or time.monotonic() > deadline:
            return None
        time.sleep(2)


def champion_split(store: str, name: str, version: str, folder: Path) -> Reference:
    """The champion's latest evaluated test split, downloaded into folder/test.parquet, with the data checks of
    the data the version was trained on beside it (its run's data/ reports); refused without a champion that
    has one."""
    client = MlflowClient(store)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(
            f"models:/{name}/{version}: no champion of {name} to take a test split from; run the pipeline "
            "(make pipeline) once, then register versions to evaluate"
        ) from None
    evaluated = client.get_run(champion.run_id).data.tags.get(LATEST)
    if not evaluated:
        raise ConfigError(f"champion v{champion.version} of {name} has no evaluation run to take a test split from")
    folder.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(store)
    split = Path(mlflow.artifacts.download_artifacts(run_id=evaluated, artifact_path=TEST_SPLIT_ARTIFACT))
    (folder / "test.parquet").write_bytes((split / "test.parquet").read_bytes())
    trained_on = client.get_model_version(name, version).run_id
    if trained_on and any(a.path == f"data/{STATS}" for a in client.list_artifacts(trained_on, "data")):
        stats = mlflow.artifacts.download_artifacts(run_id=trained_on, artifact_path=f"data/{STATS}")
        (folder / STATS).write_bytes(Path(stats).read_bytes())
    return Reference(folder, dataset_source(client, evaluated), evaluated)


def training_run_of(store: str, name: str, version: str) -> str:
    """The run a version was registered from: its evaluation run hangs under it."""
    run_id = MlflowClient(store).get_model_version(name, version).run_id
    if not run_id:
        raise ConfigError(
            f"models:/{name}/{version} names no run it came from; register it from a run (mlflow.register_model "
            "with a runs:/ or models:/ URI of a model logged in a run)"
        )
    return run_id
