"""MLflow: one run per pipeline run, opened by the train stage; each evaluation a child run of it (evalruns)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.types import ColSpec, DataType, Schema

from sftops.config import Config
from sftops.errors import ConfigError, SftopsError, TrackingError
from sftops.evaluate.promotion import CHALLENGER, CHAMPION, Champion, Decision, decide, metric_family, suite_results
from sftops.provenance.manifest import build_manifest, dvc_md5, git_commit, model_section, params_sha256, revision_tags
from sftops.redact import redact, tracking_credentials
from sftops.workspace import project_root

MANIFEST_ARTIFACT = "reproduce/manifest.json"
# Run tags copied onto the registered version: what made it.
LINEAGE_TAGS = ("base_model", "method", "data.curated_dvc_md5", "git.commit", "params.sha256")
REVISION_TAG = re.compile(r"^(model|data\.[A-Za-z0-9_.-]+)\.revision$")  # and the revisions it was made from
# Whether the version's data and code are recorded in git and DVC (the pipeline flow's record step sets them).
VERSIONED, VERSIONED_REASON = "data.versioned", "data.versioned_reason"
UNRECORDED = (
    "registered by a stage run outside the pipeline flow (dvc repro, sftops run): no git ref records "
    "its params and dvc.lock; run the flow (make pipeline) to record and promote"
)
# How the promotion gate measures a champion: (model folder, curated folder) -> (metrics, generations table).
Measure = Callable[[Path, Path], tuple[dict, dict]]


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


def configure(cfg: Config) -> str:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment)
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
    from sftops.layout import CARD, HISTOGRAM

    mlflow.log_input(curated_dataset(curated, digest), context="training")
    for name in (CARD, HISTOGRAM):
        if (curated / name).exists():
            mlflow.log_artifact(str(curated / name), artifact_path="data")


def log_params(cfg: Config) -> None:
    # Lists (the sources) are logged as flow-style YAML; MLflow caps a param value at 6000 characters.
    params = {}
    for key, value in cfg.flat().items():
        text = yaml.safe_dump(value, default_flow_style=True).strip() if isinstance(value, list) else value
        params[key] = redact(str(text))[:6000] if text is not None else "null"
    mlflow.log_params(params)


_buffer: MetricBuffer | None = None  # the open pipeline run's, while training


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    if _buffer is not None:
        _buffer.log(metrics, step)
    else:
        mlflow.log_metrics(metrics, step=step)


def log_step(step: int, metrics: dict[str, float]) -> None:
    """The training loop's per-step callback."""
    log_metrics(metrics, step)


def flush() -> None:
    """Send every buffered metric now (MLflow's full retries); TrackingError if the server does not answer."""
    if _buffer is not None and not _buffer.flush(full_retries=True):
        raise _buffer.unreachable()


def unreachable(exc: BaseException) -> bool:
    """Whether an error means the tracking server (or a database store) did not answer, as opposed to a refused
    request."""
    import requests
    import sqlalchemy.exc

    if isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError, sqlalchemy.exc.OperationalError)):
        return True
    return isinstance(exc, mlflow.exceptions.MlflowException) and "API request to" in str(exc)


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
            with _environment(light):
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


@contextmanager
def pipeline_run(cfg: Config, reports: list[Path], revisions: dict[str, Any] | None = None) -> Iterator[dict[str, str]]:
    """Open the pipeline's MLflow run with its params, lineage tags, resolved revisions (manifest.resolved_revisions)
    and data reports; yields its ids. While it
    is open, metrics go through a MetricBuffer; if the server stops answering, the stage fails with a
    TrackingError saying what was kept (checkpoints, unsent metrics) rather than a traceback."""
    global _buffer
    uri = configure(cfg)
    mlflow.set_system_metrics_sampling_interval(5)
    # System metrics (CPU, memory, GPU utilisation) are sampled in a background thread while the run is open.
    run = mlflow.start_run(run_name=f"sft-{cfg.train.method}", log_system_metrics=True)
    try:
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
        for path in reports:
            mlflow.log_artifact(str(path), artifact_path="data")
        log_curated_data(Path(cfg.paths.curated), lineage["data.curated_dvc_md5"])
        _buffer = MetricBuffer(
            run.info.run_id, uri, Path(cfg.paths.checkpoints) / f"unsent-metrics-{run.info.run_id}.jsonl"
        )
        yield {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": redact(uri)}
        flush()
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
    finally:
        _buffer = None
    mlflow.end_run()


def log_evaluation(
    run_info: dict[str, Any],
    metrics: dict[str, Any],
    table: dict[str, list],
    files: list[Path],
    suites: list[dict[str, Any]],
    test_file: Path,
) -> str:
    """The evaluate stage's results as a new evaluation run, a child of the pipeline's run, linked to the
    registered version's logged model and to the test split (see evalruns). Returns its run id."""
    from sftops.evalruns import log_evaluation_run

    return log_evaluation_run(store_of(run_info), run_info, metrics, table, files, list(suites), test_file)


def current_champion(name: str, metric: str, tracking: str, identity: dict[str, Any]) -> Champion | None:
    """The version the `champion` alias points to, with its result on `metric` comparable with an evaluation
    of this identity (the same test split digest and the settings the metric depends on), if it has one."""
    from sftops.evalruns import comparable_result

    client = MlflowClient(tracking)
    try:
        version = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        return None  # no such model or no such alias yet
    key = identity["keys"][metric_family(metric)]
    value = comparable_result(client, name, version, metric, metric_family(metric), key)
    return Champion(version, value, key if value is not None else None)


def version_tags(run_info: dict[str, Any]) -> dict[str, str]:
    return MlflowClient(store_of(run_info)).get_model_version(run_info["registered_model"], run_info["version"]).tags


def run_version_tags(run_id: str, tracking: str | None = None) -> dict[str, str]:
    """The tags of the model version registered from a run ({} when it registered none)."""
    versions = MlflowClient(tracking or tracking_uri()).search_model_versions(f"run_id='{run_id}'")
    return dict(versions[0].tags) if versions else {}


def record_version(run_info: dict[str, Any], tags: dict[str, str]) -> None:
    """Tag the registered version (and its run) with where its data and code are recorded."""
    client = MlflowClient(store_of(run_info))
    for key, value in tags.items():
        client.set_model_version_tag(run_info["registered_model"], run_info["version"], key, value)
        client.set_tag(run_info["run_id"], key, value)


def promote(
    run_info: dict[str, Any],
    metrics: dict[str, Any],
    primary_metric: str,
    margin: float,
    measure: Measure | None = None,
) -> Decision:
    """The promotion gate on the registry: decide (promotion.decide) from the version's test metrics, its data
    checks and versioning tags and the champion's linked result on the same evaluation; where the champion has
    none, measure it there first (`measure`: evaluation.champion_measurer, its result is then linked too). Then
    point the decided alias at the version, record the decision on the version and its run, and describe the
    version for reviewers."""
    from sftops.evalruns import evaluation_run

    if primary_metric not in metrics["tuned"]:
        raise ConfigError(
            f"evaluate.primary_metric={primary_metric!r} was not measured "
            "(set evaluate.num_generations > 0 for generation metrics)"
        )
    store = store_of(run_info)
    client = MlflowClient(store)
    name, version = run_info["registered_model"], str(run_info["version"])
    tags = client.get_model_version(name, version).tags
    versioned = (tags.get(VERSIONED) == "true", tags.get(VERSIONED_REASON, "no record of its data in git and DVC"))
    family = metric_family(primary_metric)
    key = metrics["evaluation"]["keys"][family]
    evaluated = evaluation_run(client, run_info["run_id"], family, key)
    champion, unmeasured = current_champion(name, primary_metric, store, metrics["evaluation"]), ""
    if champion and champion.value is None and champion.version != version and measure and evaluated:
        try:
            evaluate_champion(store, name, champion.version, evaluated, measure)
        except SftopsError as exc:  # a champion that no longer loads or fits: decided without it, and said so
            unmeasured = f" (measuring champion v{champion.version} on this test set failed: {exc})"
        champion = current_champion(name, primary_metric, store, metrics["evaluation"])
    checks = metrics.get("data_checks", {"passed": True, "note": "no data checks recorded"})
    decision = decide(
        primary_metric,
        metrics["tuned"][primary_metric],
        key,
        version,
        champion,
        margin,
        (checks["passed"], checks["note"]),
        versioned,
        suite_results(metrics),
        base_value=metrics["base"].get(primary_metric),
    )
    decision = replace(decision, reason=decision.reason + unmeasured)
    _record_decision(client, run_info, decision)
    describe(run_info, metrics, decision, evaluated)
    return decision


def evaluate_champion(store: str, name: str, version: str, evaluated: str, measure: Measure) -> str:
    """Measure version `version` on the test split the challenger's evaluation run `evaluated` logged, and log
    the result as that version's new evaluation run (linked to its model and to the same dataset)."""
    import tempfile

    from sftops.evalruns import TEST_SPLIT_ARTIFACT, dataset_source, log_evaluation_run

    mlflow.set_tracking_uri(store)
    champion = MlflowClient(store).get_model_version(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        split = mlflow.artifacts.download_artifacts(run_id=evaluated, artifact_path=TEST_SPLIT_ARTIFACT, dst_path=tmp)
        curated = Path(split)
        metrics, table = measure(local_model_dir(f"models:/{name}/{version}"), curated)
        run_info = {"run_id": champion.run_id, "registered_model": name, "version": version}
        source = dataset_source(MlflowClient(store), evaluated)
        return log_evaluation_run(store, run_info, metrics, table, [], [], curated / "test.parquet", source)


def _record_decision(client: MlflowClient, run_info: dict[str, Any], decision: Decision) -> None:
    name, version = run_info["registered_model"], str(run_info["version"])
    client.set_model_version_tag(name, version, "promotion.decision", decision.alias)
    client.set_model_version_tag(name, version, "promotion.reason", decision.reason[:5000])
    client.set_tag(run_info["run_id"], "promotion.decision", decision.alias)
    client.set_tag(run_info["run_id"], "promotion.reason", decision.reason[:5000])
    client.log_dict(run_info["run_id"], decision.as_dict(), "eval/promotion.json")
    client.set_registered_model_alias(name, decision.alias, version)
    if decision.alias == CHAMPION:
        # A promoted version is no longer the challenger.
        try:
            if str(client.get_model_version_by_alias(name, CHALLENGER).version) == version:
                client.delete_registered_model_alias(name, CHALLENGER)
        except mlflow.exceptions.MlflowException:
            pass


def describe(run_info: dict[str, Any], metrics: dict[str, Any], decision: Decision, evaluated: str | None) -> str:
    """Write the version's description (what the MLflow UI shows on the version's page); returns it."""
    from sftops.evalruns import describe_version

    store = store_of(run_info)
    client = MlflowClient(store)
    name, version = run_info["registered_model"], str(run_info["version"])
    try:
        manifest = load_manifest(run_info["run_id"], store)
    except ConfigError:
        manifest = {}
    tags = client.get_model_version(name, version).tags
    text = describe_version(run_info, tags, manifest, metrics, decision.as_dict(), evaluated, store)
    client.update_model_version(name, version, description=text)
    return text


def report_link(run_info: dict[str, Any], metrics: dict[str, Any], primary_metric: str) -> str | None:
    """Where a reviewer opens the report of this evaluation (see evalruns.report_link); None without one."""
    from sftops.evalruns import evaluation_run
    from sftops.evalruns import report_link as link

    family = metric_family(primary_metric)
    store = store_of(run_info)
    key = metrics["evaluation"]["keys"][family]
    evaluated = evaluation_run(MlflowClient(store), run_info["run_id"], family, key)
    return link(store, evaluated) if evaluated else None


def log_and_register_model(model_dir: Path, name: str) -> dict[str, Any]:
    """Log the saved model as an MLflow transformers chat model (see serving.py), register it as a new version
    tagged with its lineage, and complete the run's reproducibility manifest with the model's hashes."""
    from sftops.serving import log_chat_model

    info = log_chat_model(model_dir, name)
    run = mlflow.active_run()
    client = MlflowClient()
    version = str(info.registered_model_version)
    run_tags = client.get_run(run.info.run_id).data.tags
    for key in run_tags:
        if key in LINEAGE_TAGS or REVISION_TAG.match(key):
            client.set_model_version_tag(name, version, key, run_tags[key])
    client.set_model_version_tag(name, version, VERSIONED, "false")  # until the flow has recorded it
    client.set_model_version_tag(name, version, VERSIONED_REASON, UNRECORDED)
    manifest = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{MANIFEST_ARTIFACT}")
    manifest["model"] = {**model_section(model_dir), "registered_model": name, "version": version}
    mlflow.log_dict(manifest, MANIFEST_ARTIFACT)
    client.set_model_version_tag(name, version, "manifest", f"runs:/{run.info.run_id}/{MANIFEST_ARTIFACT}")
    return {"model_uri": info.model_uri, "registered_model": name, "version": version}


_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_run_id(target: str, tracking: str | None = None) -> str:
    """The run behind models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/... or a bare run id."""
    client = MlflowClient(tracking or tracking_uri())
    try:
        if target.startswith("models:/"):
            name, _, rest = target[len("models:/") :].partition("/")
            if "@" in name:
                name, alias = name.split("@", 1)
                return client.get_model_version_by_alias(name, alias).run_id
            return client.get_model_version(name, rest.strip("/")).run_id
        if target.startswith("runs:/"):
            return target[len("runs:/") :].split("/", 1)[0]
        if _RUN_ID.match(target):
            return client.get_run(target).info.run_id
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(
            f"{target}: not found in the MLflow store {tracking or tracking_uri()} ({exc.error_code})"
        ) from None
    raise ConfigError(f"{target!r} is not models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/... or a run id")


def model_uri(target: str) -> str:
    """A loadable MLflow model URI: a bare run id means that run's logged model."""
    return f"runs:/{target}/model" if _RUN_ID.match(target) else target


def load_manifest(run_id: str, tracking: str | None = None) -> dict[str, Any]:
    mlflow.set_tracking_uri(tracking or tracking_uri())
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{MANIFEST_ARTIFACT}")
    except (mlflow.exceptions.MlflowException, OSError):
        raise ConfigError(
            f"run {run_id} has no {MANIFEST_ARTIFACT}: it was made before manifests were recorded"
        ) from None


def local_model_dir(uri: str, tracking: str | None = None) -> Path:
    """A local folder of a logged or registered model that modeling.load_finetuned loads (see serving.py)."""
    from sftops.serving import local_model_dir as download

    mlflow.set_tracking_uri(tracking or tracking_uri())
    return download(uri)


def predict(uri: str, prompts: list[str], max_new_tokens: int, tracking: str | None = None) -> list[str]:
    """Answers from a logged or registered model, generated as from a local model folder (sftops generate)."""
    from sftops.evaluate.generation import answer
    from sftops.modeling import load_finetuned

    model, tokenizer = load_finetuned(local_model_dir(uri, tracking))
    return answer(model, tokenizer, prompts, max_new_tokens)
