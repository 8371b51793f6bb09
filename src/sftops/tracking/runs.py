"""The training run in MLflow: one per pipeline run, opened by the train stage, with its params, lineage tags,
resolved revisions, the curated data as its dataset input, and its per-step metrics, kept through a tracking
server outage (MetricBuffer). Each evaluation is a child run of it (tracking.evaluations)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.types import ColSpec, DataType, Schema

from sftops.config import Config
from sftops.errors import ConfigError, TrackingError
from sftops.layout import CARD, HISTOGRAM, INGEST_REPORT, STATS
from sftops.provenance.manifest import build_manifest, dvc_md5, git_commit, params_sha256, revision_tags
from sftops.redact import redact
from sftops.tracking.pages import EXPERIMENT_KIND_TAG, MODEL_TRAINING
from sftops.tracking.store import answering, tracking_uri, unreachable

MANIFEST_ARTIFACT = "reproduce/manifest.json"


def configure(cfg: Config) -> str:
    uri = answering(tracking_uri())
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(cfg.tracking.experiment)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # a kind set in the UI since is the user's choice
        MlflowClient(uri).set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return uri


def data_lineage(cfg: Config) -> dict[str, str]:
    tags = {"data.curated_dvc_md5": dvc_md5(Path(cfg.paths.curated))}
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
    return tags


def split_rows(curated: Path) -> dict[str, int]:
    """Rows per split, from the Parquet footers (no row is read)."""
    import pyarrow.parquet as pq

    from sftops.data.store import SPLITS, split_file

    return {s: pq.ParquetFile(split_file(curated, s)).metadata.num_rows for s in SPLITS}


class MetadataDataset(MetaDataset):
    """A dataset made of metadata only, with a profile (MLflow's MetaDataset has none to show)."""

    def __init__(self, source: DatasetSource, name: str, digest: str, schema: Schema, profile: dict[str, Any]) -> None:
        self._profile = profile
        super().__init__(source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def curated_dataset(curated: Path, digest: str) -> MetadataDataset:
    """The curated data as the MLflow UI shows it: name, digest (the DVC hash), source (the folder), schema and
    profile (rows in all and per split), from the Parquet footers: no data frame of a million rows to say so."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    rows = split_rows(curated)
    profile = {"num_rows": sum(rows.values()), **{f"{split}_rows": n for split, n in rows.items()}}
    schema = Schema([ColSpec(DataType.string, column) for column in ("id", "source", "split")])
    return MetadataDataset(resolve_dataset_source(str(curated.resolve())), "curated", digest, schema, profile)


def log_curated_data(curated: Path, digest: str) -> None:
    """The curated data as the run's dataset input (digest: its DVC hash, so the run names the exact data
    version), and its data card with the token-length histograms as artifacts."""
    mlflow.log_input(curated_dataset(curated, digest), context="training")
    for name in (CARD, HISTOGRAM):
        if (curated / name).exists():
            mlflow.log_artifact(str(curated / name), artifact_path="data")


def applied_params(cfg: Config) -> dict[str, Any]:
    """The params as dotted keys, less the launch settings that did not apply to the run (a local run's cluster
    settings: launch.*, but launch.target, only for a launched job)."""
    launch = {f"launch.{key}" for key in cfg.launch.applied()}
    return {k: v for k, v in cfg.flat().items() if not k.startswith("launch.") or k in launch}


def log_params(cfg: Config) -> None:
    # Lists (the sources) are logged as flow-style YAML; MLflow caps a param value at 6000 characters.
    params = {}
    for key, value in applied_params(cfg).items():
        text = yaml.safe_dump(value, default_flow_style=True).strip() if isinstance(value, list) else value
        params[key] = redact(str(text))[:6000] if text is not None else "null"
    mlflow.log_params(params)


class MetricBuffer:
    """Metrics that outlive a tracking server going away. Each value is sent at once while the server answers;
    when it does not, the values are kept (and written to `spool`) and sent with the next ones, trying again at
    most every `retry_s` seconds with a single HTTP retry, so a training step never waits minutes for a server
    that is down. flush(full_retries=True), at the end of training, uses MLflow's own retry settings
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR, _TIMEOUT)."""

    def __init__(self, run_id: str, uri: str, spool: Path, retry_s: float = 30.0) -> None:
        from mlflow.entities import Metric

        self._metric = Metric
        self.run_id, self.uri, self.spool, self.retry_s = run_id, uri, spool, retry_s
        self.client = MlflowClient(uri)
        self.pending: list[Any] = []
        self.failed_at: float | None = None
        self.error: BaseException | None = None

    def log(self, metrics: dict[str, float], step: int | None) -> None:
        now = int(time.time() * 1000)
        self.pending += [self._metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if self.failed_at is None or time.monotonic() - self.failed_at >= self.retry_s:
            self.flush()

    def flush(self, full_retries: bool = False) -> bool:
        light = (
            {}
            if full_retries or "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in os.environ
            else {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
        )
        try:
            with _environment(light):  # MLflow reads its retry budget from the environment at each request
                while self.pending:
                    chunk = self.pending[:1000]  # MLflow's log_batch limit
                    self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
                    del self.pending[: len(chunk)]
        except Exception as exc:
            if not unreachable(exc):
                raise
            self.failed_at, self.error = time.monotonic(), exc
            self.spool.parent.mkdir(parents=True, exist_ok=True)
            self.spool.write_text(
                "".join(
                    json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n"
                    for m in self.pending
                )
            )
            return False
        self.failed_at = None
        self.spool.unlink(missing_ok=True)
        return True

    def unreachable(self) -> TrackingError:
        return TrackingError(
            f"the MLflow tracking server at {redact(self.uri)} stopped answering ({type(self.error).__name__}); "
            f"{len(self.pending)} metric values of run {self.run_id} were not sent and are saved in {self.spool}"
        )


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def log_revisions(revisions: dict[str, Any]) -> None:
    """The commits the run's hub model and datasets resolved to: tags model.revision and data.<source>.revision
    (copied onto the registered version), and the same values as params model.revision_resolved and
    data.<source>.revision_resolved beside the configured model.revision (which stays as params.yaml has it)."""
    tags = revision_tags(revisions)
    mlflow.set_tags(tags)
    mlflow.log_params({f"{key}_resolved": value for key, value in tags.items()})


class TrainingRun:
    """The open training run, as the train stage logs to it: metrics go through a MetricBuffer, so a step never
    waits minutes for a server that is down."""

    def __init__(self, ids: dict[str, str], buffer: MetricBuffer | None) -> None:
        self.ids, self.buffer = ids, buffer

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.buffer is not None:
            self.buffer.log(metrics, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.buffer is not None:
            mlflow.set_tags(tags)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.buffer is not None:
            mlflow.log_params(params)

    def log_step(self, step: int, record: dict[str, float]) -> None:
        """The training loop's per-step hook."""
        self.log_metrics(record, step)

    def log_history(self, history: list[dict[str, float]]) -> None:
        """Steps trained by an earlier, interrupted run of the job (this run resumed after them): its record
        starts at step 1 too."""
        for step, record in enumerate(history, start=1):
            self.log_metrics(record, step)

    def flush(self) -> None:
        """Send every buffered metric now (MLflow's full retries); TrackingError if the server does not answer."""
        if self.buffer is not None and not self.buffer.flush(full_retries=True):
            raise self.buffer.unreachable()


NOT_TRACKED = TrainingRun({}, None)  # what the processes other than the main one log to: nothing


@contextmanager
def pipeline_run(cfg: Config, revisions: dict[str, Any] | None = None) -> Iterator[TrainingRun]:
    """Open the pipeline's MLflow run with its params, lineage tags, resolved revisions (manifest.resolved_revisions)
    and data reports. If the server stops answering, the stage fails with a TrackingError saying what was kept
    (checkpoints, unsent metrics) rather than a traceback."""
    uri = configure(cfg)
    # System metrics (CPU, memory, GPU utilisation) are sampled in a background thread while the run is open:
    # every 5 s unless the user set MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL (a run shorter than it has no sample).
    if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(5)
    run = mlflow.start_run(run_name=f"sft-{cfg.train.method}", log_system_metrics=True)
    try:
        log_run_description(cfg, revisions)
        buffer = MetricBuffer(
            run.info.run_id, uri, Path(cfg.paths.checkpoints) / f"unsent-metrics-{run.info.run_id}.jsonl"
        )
        ids = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": redact(uri)}
        tracked = TrainingRun(ids, buffer)
        yield tracked
        tracked.flush()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            mlflow.end_run("FAILED")
        if not (isinstance(exc, TrackingError) or unreachable(exc)):
            raise
        cause = (
            exc
            if isinstance(exc, TrackingError)
            else f"the MLflow tracking server at {redact(uri)} stopped answering ({type(exc).__name__})"
        )
        raise TrackingError(
            f"{cause}; the model was not registered and {cfg.paths.model} is unchanged; checkpoints in "
            f"{cfg.paths.checkpoints} are kept: re-run once the server is back to resume"
        ) from None
    mlflow.end_run()


def log_run_description(cfg: Config, revisions: dict[str, Any] | None) -> None:
    """What the run is: its params, lineage tags, the manifest with the resolved revisions, the data reports and
    the curated data as its dataset input."""
    log_params(cfg)
    lineage = data_lineage(cfg)
    mlflow.set_tags(
        {
            **lineage,
            "base_model": redact(cfg.model.base),
            "method": cfg.train.method,
            "params.sha256": params_sha256(cfg),
        }
    )
    manifest = build_manifest(cfg, revisions=revisions)
    log_revisions(manifest["revisions"])
    mlflow.log_dict(manifest, MANIFEST_ARTIFACT)
    curated = Path(cfg.paths.curated)
    for path in (curated / INGEST_REPORT, curated / STATS):  # the ingest report, as format copied it
        mlflow.log_artifact(str(path), artifact_path="data")
    log_curated_data(curated, lineage["data.curated_dvc_md5"])


def load_manifest(run_id: str, tracking: str | None = None) -> dict[str, Any]:
    """The reproducibility manifest a training run logged."""
    mlflow.set_tracking_uri(tracking or tracking_uri())
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{MANIFEST_ARTIFACT}")
    except (mlflow.exceptions.MlflowException, OSError):
        raise ConfigError(
            f"run {run_id} has no {MANIFEST_ARTIFACT}: it was made before manifests were recorded"
        ) from None
