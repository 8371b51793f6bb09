"""The export stage's files and verdicts in MLflow: the files as artifacts of the training run (`export/`), each
GGUF file's parity figures as its metrics (`export/QUANT/...`), and one line per export as a tag of the run and
of the registered version (`export.gguf.QUANT`, `export.vllm`), which the version's description lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from sftops.evaluate.parity import summary
from sftops.export import vllm
from sftops.tracking.store import store_of
from sftops.tracking.tags import EXPORT_PREFIX

ARTIFACTS = "export"


def gguf_line(block: dict[str, Any]) -> str:
    """The parity verdict of one GGUF file, its mean NLL cost and its size (or why it was not written)."""
    if not block["checked"]:
        return summary(block)
    return f"{summary(block)}; mean NLL cost {block['mean_nll_cost']:+.2e} nats/token; {block['bytes']:,} bytes"


def gguf_metrics(quant: str, block: dict[str, Any]) -> dict[str, float]:
    keys = ("mean_nll_cost", "max_nll_gap", "answers_equal", "stops_honoured", "rows", "bytes")
    keys += tuple(k for k in ("write_seconds", "verify_seconds") if k in block)
    return {f"{ARTIFACTS}/{quant}/{k}": float(block[k]) for k in keys}


def export_tags(gguf: dict[str, dict[str, Any]], served: dict[str, Any]) -> dict[str, str]:
    tags = {f"{EXPORT_PREFIX}gguf.{q}": gguf_line(b) for q, b in gguf.items()}
    tags[f"{EXPORT_PREFIX}vllm"] = vllm.summary(served)
    return {k: v[:5000] for k, v in tags.items()}


def log_exports(
    run_info: dict[str, Any], gguf: dict[str, dict[str, Any]], served: dict[str, Any], files: list[Path]
) -> None:
    """On the training run that made the model: the files and the metrics; on it and its registered version: the
    verdicts (a run that registered no version gets the run's)."""
    client = MlflowClient(store_of(run_info))
    run_id = run_info["run_id"]
    for file in files:
        client.log_artifact(run_id, str(file), ARTIFACTS)
    for quant, block in gguf.items():
        for key, value in (gguf_metrics(quant, block) if block["checked"] else {}).items():
            client.log_metric(run_id, key, value)
    for key, value in export_tags(gguf, served).items():
        client.set_tag(run_id, key, value)
        if run_info.get("version"):
            client.set_model_version_tag(run_info["registered_model"], str(run_info["version"]), key, value)
