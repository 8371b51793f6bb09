"""MLflow: one run per pipeline run. The train stage opens it; the evaluate stage adds to it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.models import infer_signature

from sftops.config import Config

RUN_FILE = "run.json"


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    """Where runs go is the environment's business (a team server, a local file), not the params'."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def configure(cfg: Config) -> str:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    return uri


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def dvc_md5(path: Path) -> str:
    """The hash DVC records for a directory output (in dvc.lock), computed here so that runs made outside
    `dvc repro` (the Prefect flow, `sftops run`) carry the same data version: md5 of the sorted
    [{"md5", "relpath"}] listing of the folder's files, plus '.dir'."""
    entries = [
        {"md5": hashlib.md5(f.read_bytes()).hexdigest(), "relpath": f.relative_to(path).as_posix()}
        for f in sorted(p for p in Path(path).rglob("*") if p.is_file())
    ]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def data_lineage(cfg: Config) -> dict[str, str]:
    tags = {"data.curated_dvc_md5": dvc_md5(Path(cfg.paths.curated))}
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
    return tags


def log_curated_data(curated: Path, digest: str) -> None:
    """The curated data as the run's dataset input (digest: its DVC hash, so the run names the exact data
    version), and its data card with the token-length histograms as artifacts."""
    import pandas as pd

    from sftops.data.card import CARD, HISTOGRAM
    from sftops.data.store import SPLITS, split_file

    frames = [pd.read_parquet(split_file(curated, s), columns=["id", "source", "split"]) for s in SPLITS]
    dataset = mlflow.data.from_pandas(pd.concat(frames, ignore_index=True), source=str(curated.resolve()),
                                      name="curated", digest=digest)
    mlflow.log_input(dataset, context="training")
    for name in (CARD, HISTOGRAM):
        if (curated / name).exists():
            mlflow.log_artifact(str(curated / name), artifact_path="data")


def log_params(cfg: Config) -> None:
    # Lists (the sources) are logged as flow-style YAML; MLflow caps a param value at 6000 characters.
    params = {}
    for key, value in cfg.flat().items():
        text = yaml.safe_dump(value, default_flow_style=True).strip() if isinstance(value, list) else value
        params[key] = str(text)[:6000] if text is not None else "null"
    mlflow.log_params(params)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics(metrics, step=step)


def log_step(step: int, metrics: dict[str, float]) -> None:
    """The training loop's per-step callback."""
    log_metrics(metrics, step)


@contextmanager
def pipeline_run(cfg: Config, reports: list[Path]) -> Iterator[dict[str, str]]:
    """Open the pipeline's MLflow run with its params, lineage tags and data reports; yields its ids."""
    uri = configure(cfg)
    mlflow.set_system_metrics_sampling_interval(5)
    # System metrics (CPU, memory, GPU utilisation) are sampled in a background thread while the run is open.
    with mlflow.start_run(run_name=f"sft-{cfg.train.method}", log_system_metrics=True) as run:
        log_params(cfg)
        lineage = data_lineage(cfg)
        mlflow.set_tags({**lineage, "base_model": cfg.model.base, "method": cfg.train.method})
        for path in reports:
            mlflow.log_artifact(str(path), artifact_path="data")
        log_curated_data(Path(cfg.paths.curated), lineage["data.curated_dvc_md5"])
        yield {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": uri}


def _unused_table_file(client: MlflowClient, run_id: str) -> str:
    """log_table appends to an existing table file: a re-evaluation (new eval params) gets a file of its own."""
    existing = {a.path for a in client.list_artifacts(run_id, "eval")}
    name, n = "eval/generations.json", 1
    while name in existing:
        n += 1
        name = f"eval/generations-{n}.json"
    return name


def log_evaluation(run_info: dict[str, Any], metrics: dict[str, Any], table: dict[str, list], metrics_file: Path) -> None:
    """Add the evaluate stage's results to the pipeline's run, and tag the registered version with them."""
    mlflow.set_tracking_uri(run_info["tracking_uri"])
    client = MlflowClient(run_info["tracking_uri"])
    table_file = _unused_table_file(client, run_info["run_id"])
    with mlflow.start_run(run_id=run_info["run_id"]):
        flat = {f"test_{who}_{k}": v for who in ("base", "tuned") for k, v in metrics[who].items()}
        mlflow.log_metrics({**flat, "test_nll_improvement": metrics["nll_improvement"], "test_rows": metrics["test_rows"]})
        mlflow.log_table(table, artifact_file=table_file)
        mlflow.log_artifact(str(metrics_file), artifact_path="eval")
    for key, value in metrics["tuned"].items():
        client.set_model_version_tag(run_info["registered_model"], run_info["version"], f"test_{key}", f"{value:.4f}")


def log_and_register_model(model_dir: Path, name: str) -> dict[str, Any]:
    """Log the saved model as an MLflow pyfunc (loadable with mlflow.pyfunc.load_model) and register it."""
    from sftops.serving import SFTChatModel, pip_requirements

    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=SFTChatModel(),
        artifacts={"model": str(model_dir)},
        pip_requirements=pip_requirements(),
        signature=infer_signature(["a question"], ["an answer"], params={"max_new_tokens": 64}),
        registered_model_name=name,
    )
    return {"model_uri": info.model_uri, "registered_model": name, "version": str(info.registered_model_version)}
