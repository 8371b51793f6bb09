"""The five stages by name, and the whole pipeline in one process."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

from sftops.config import Config
from sftops.layout import GENERATIONS_FILE, MODEL_DIR, REPORT_FILE

# Imported when called: `sftops ingest` loads the ingest stage's code, not torch and the train stage's.
STAGES = {
    "ingest": "sftops.stages.ingest:run_ingest",
    "format": "sftops.stages.format:run_format",
    "train": "sftops.stages.train:run_train",
    "evaluate": "sftops.stages.evaluate:run_evaluate",
    "export": "sftops.stages.export:run_export",
}


def stage_function(name: str) -> Callable[[Config], Any]:
    module, function = STAGES[name].split(":")
    return getattr(import_module(module), function)


def where(cfg: Config) -> dict[str, str]:
    """Where a finished run left its results."""
    from sftops.redact import redact
    from sftops.tracking.store import tracking_uri  # MLflow: only when asked

    uri = redact(tracking_uri())
    return {
        "raw data": cfg.paths.raw,
        "curated data": cfg.paths.curated,
        "model": f"{cfg.paths.model}/{MODEL_DIR}",
        "metrics": cfg.paths.metrics,
        "generations": f"{cfg.paths.reports}/{GENERATIONS_FILE}",
        "report": f"{cfg.paths.reports}/{REPORT_FILE}",
        "exports": cfg.paths.exports,
        "mlflow": f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri,
    }


def run_all(cfg: Config) -> dict[str, Any]:
    results = {name: stage_function(name)(cfg) for name in STAGES}
    return {"metrics": results["evaluate"].metrics, "where": where(cfg)}
