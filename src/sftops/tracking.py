"""MLflow: one run per pipeline run. The train stage opens it; the evaluate stage adds to it."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import mlflow
from mlflow.models import infer_signature
import yaml

from sftops.config import Config

RUN_FILE = "run.json"


def configure(cfg: Config) -> str:
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    return mlflow.set_experiment(cfg.tracking.experiment).experiment_id


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def dir_digest(path: Path) -> str:
    """SHA-256 over the relative paths and bytes of every file under path: the data's own fingerprint."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode() + b"\0")
        h.update(hashlib.sha256(file.read_bytes()).digest())
    return h.hexdigest()


def dvc_hash(path: str, lock: Path = Path("dvc.lock")) -> str | None:
    """The md5 DVC recorded for an output in dvc.lock (DVC writes each stage's entry as it finishes)."""
    if not lock.exists():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path", "").rstrip("/") == path.rstrip("/"):
                return out.get("md5")
    return None


def data_lineage(cfg: Config) -> dict[str, str]:
    tags = {"data.curated_sha256": dir_digest(Path(cfg.paths.curated))}
    dvc_md5 = dvc_hash(cfg.paths.curated)
    if dvc_md5:
        tags["data.curated_dvc_md5"] = dvc_md5
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
    return tags


def log_params(cfg: Config) -> None:
    # Lists (the sources) are logged as flow-style YAML; MLflow caps a param value at 6000 characters.
    params = {}
    for key, value in cfg.flat().items():
        text = yaml.safe_dump(value, default_flow_style=True).strip() if isinstance(value, list) else value
        params[key] = str(text)[:6000] if text is not None else "null"
    mlflow.log_params(params)


def step_logger(step: int, metrics: dict[str, float]) -> None:
    mlflow.log_metrics(metrics, step=step)


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
