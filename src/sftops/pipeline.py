"""The four stages by name, and the whole pipeline in one process."""

from __future__ import annotations

from typing import Any

from sftops.config import Config
from sftops.curate import run_format
from sftops.evaluation import run_evaluate
from sftops.finetune import run_train
from sftops.ingest import run_ingest
from sftops.redact import redact
from sftops.tracking import tracking_uri

STAGES = {"ingest": run_ingest, "format": run_format, "train": run_train, "evaluate": run_evaluate}


def where(cfg: Config) -> dict[str, str]:
    """Where a finished run left its results."""
    uri = redact(tracking_uri())
    return {
        "raw data": cfg.paths.raw,
        "curated data": cfg.paths.curated,
        "model": f"{cfg.paths.model}/model",
        "metrics": cfg.paths.metrics,
        "generations": f"{cfg.paths.reports}/generations.csv",
        "report": f"{cfg.paths.reports}/report.html",
        "mlflow": f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri,
    }


def run_all(cfg: Config) -> dict[str, Any]:
    results = {name: fn(cfg) for name, fn in STAGES.items()}
    return {"metrics": results["evaluate"], "where": where(cfg)}
