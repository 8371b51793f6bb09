"""The SFT pipeline as a Prefect flow: the same four library stages that `dvc repro` runs, as tasks; and the
evaluation alone, for a given model. Deployed by prefect.yaml (a nightly schedule on a process work pool).

    python flows/sft_pipeline.py                      # params.yaml, Prefect's temporary local server
    python flows/sft_pipeline.py --set train.max_steps=10
    python flows/sft_pipeline.py --evaluate-only runs/<digest>/models
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Without PREFECT_API_URL, Prefect starts a temporary local server; its 20 s default start-up limit is too
# short on a busy 2-core machine (seen in CI-like runs). A user's own setting wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import Task, flow, task  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.client.schemas.objects import TaskRun  # noqa: E402
from prefect.logging.handlers import APILogHandler  # noqa: E402
from prefect.states import State  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from sftops.config import Config, isolate_outputs, load_config  # noqa: E402
from sftops.data.card import CARD  # noqa: E402
from sftops.errors import SftopsError  # noqa: E402
from sftops.fingerprints import text_sha256  # noqa: E402
from sftops.pipeline import STAGES, where  # noqa: E402
from sftops.stagekeys import outputs_fresh, record_outputs, stage_key  # noqa: E402


def retry_unless_user_error(task: Task, task_run: TaskRun, state: State) -> bool:
    """Bad params or bad data fail the same way on every try; a dropped connection may not."""
    try:
        state.result()
    except SftopsError:
        return False
    except Exception:  # noqa: BLE001 - any other failure is worth another try
        return True
    return True


# Stage outputs live on disk (data/, models/); the tasks pass the typed config, never large objects.
# Tasks that touch the network or the tracking server retry with exponential backoff (10, 20, 40 s, jittered);
# train's retry resumes from its last checkpoint. Results are persisted: they are the cache (see run_stage).
IO_RETRIES: dict[str, Any] = dict(
    retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5,
    retry_condition_fn=retry_unless_user_error,
)
ingest = task(STAGES["ingest"], name="ingest", persist_result=True, **IO_RETRIES)  # files, packages, the hub
format_data = task(STAGES["format"], name="format", persist_result=True)  # local computation only
train = task(STAGES["train"], name="train", persist_result=True, retries=1, retry_delay_seconds=30,
             retry_condition_fn=retry_unless_user_error)  # MLflow logging and registration
evaluate = task(STAGES["evaluate"], name="evaluate", persist_result=True, **IO_RETRIES)  # MLflow registry


def run_stage(stage_task: Task, stage: str, cfg: Config) -> Any:
    """Run a stage, or take its cached result when its inputs as dvc.yaml declares them (deps hashed the way DVC
    does, its params sections) are unchanged and the outputs they made are still in place: so a change of
    train.* re-runs train and evaluate, never ingest and format, as `dvc repro` would."""
    key = stage_key(stage, cfg)
    if key is None:  # no dvc.yaml entry here to say what the stage depends on: always run
        return stage_task.with_options(cache_policy=NO_CACHE)(cfg)
    fresh = outputs_fresh(stage, cfg, key)
    result = stage_task.with_options(cache_key_fn=lambda *_: key, refresh_cache=not fresh)(cfg)
    record_outputs(stage, cfg, key)
    return result


def show_library_logs() -> None:
    """The library's log lines (one per training step) appear in the Prefect UI with the run's own."""
    logger = logging.getLogger("sftops")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())


def data_card(cfg: Config) -> str:
    return (Path(cfg.paths.curated) / CARD).read_text(encoding="utf-8")


def metrics_markdown(metrics: dict, cfg: Config) -> str:
    """Headline numbers, the promotion decision and where the report is."""
    rows = "\n".join(f"| {r['metric']} | {r['base']:.4f} | {r['tuned']:.4f} |" for r in metrics_table(metrics))
    places = "\n".join(f"- {k}: `{v}`" for k, v in where(cfg).items())
    level = round(100 * metrics["confidence"])
    headline = (
        f"**Held-out response NLL {metrics['base']['nll']:.4f} → {metrics['tuned']['nll']:.4f}** "
        f"(improvement {metrics['nll_improvement']:+.4f}, {level}% CI [{metrics['nll_improvement_ci_low']:+.4f}, "
        f"{metrics['nll_improvement_ci_high']:+.4f}], win rate {metrics['win_rate']:.2f})"
    )
    promotion = metrics["promotion"]
    return (
        f"## SFT results ({metrics['test_rows']} test rows)\n\n{headline}\n\n"
        f"Registry: **{promotion['alias']}**: {promotion['reason']}\n\n"
        f"Report: `{metrics['report']}` (also in the MLflow run's artifacts, eval/report.html)\n\n"
        f"| metric | base | tuned |\n|---|---|---|\n{rows}\n\n{places}\n"
    )


def metrics_table(metrics: dict) -> list[dict[str, Any]]:
    return [{"metric": key, "base": metrics["base"][key], "tuned": metrics["tuned"][key]}
            for key in metrics["tuned"] if key in metrics["base"]]


def report_link(run: dict, cfg: Config) -> str:
    """The HTML report on the MLflow server where reviewers can open it; the local file otherwise."""
    uri = urlsplit(run.get("tracking_uri", ""))
    if uri.scheme in {"http", "https"}:
        server = f"{uri.scheme}://{uri.hostname}" + (f":{uri.port}" if uri.port else "") + uri.path.rstrip("/")  # no user:password@
        return f"{server}/get-artifact?path=eval/report.html&run_uuid={run['run_id']}"
    return (Path(cfg.paths.reports) / "report.html").resolve().as_uri()


def publish_results(metrics: dict, run: dict, cfg: Config) -> None:
    create_markdown_artifact(markdown=metrics_markdown(metrics, cfg), key="sft-metrics", description="base vs tuned")
    create_table_artifact(table=metrics_table(metrics), key="sft-metrics-table", description="test metrics, base vs tuned")
    create_link_artifact(link=report_link(run, cfg), link_text="report.html", key="sft-report",
                         description=f"the review of MLflow run {run['run_id']}")


@flow(name="sft-pipeline", log_prints=True)
def sft_pipeline(params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    cfg = isolate_outputs(load_config(params, overrides or []), overrides or [])
    show_library_logs()
    progress = create_progress_artifact(0.0, key="sft-progress", description="pipeline stages done (%)")
    run_stage(ingest, "ingest", cfg)
    update_progress_artifact(progress, 25.0)
    run_stage(format_data, "format", cfg)
    update_progress_artifact(progress, 50.0)
    create_markdown_artifact(markdown=data_card(cfg), key="sft-data-card", description="what the format stage did")
    run = run_stage(train, "train", cfg)
    update_progress_artifact(progress, 75.0)
    metrics = run_stage(evaluate, "evaluate", cfg)
    update_progress_artifact(progress, 100.0)
    publish_results(metrics, run, cfg)
    print(json.dumps({"mlflow_run_id": run["run_id"], "model_version": run["version"], **where(cfg)}, indent=2))
    return {"run_id": run["run_id"], "metrics": metrics}


@flow(name="sft-evaluate", log_prints=True)
def sft_evaluate(model: str = "models", params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Evaluate one trained model (a folder the train stage wrote: `models`, `runs/<digest>/models`) on the
    current test split; the review lands in that model's MLflow run, the files under runs/eval-<digest>/."""
    cfg = isolate_outputs(load_config(params, overrides or []), overrides or [])
    out = Path("runs") / f"eval-{text_sha256(json.dumps([model, overrides or []]))[:10]}"
    cfg.paths.model = model
    cfg.paths.reports, cfg.paths.metrics = str(out / "reports"), str(out / "metrics.json")
    metrics = evaluate.with_options(cache_policy=NO_CACHE)(cfg)  # says so when the folder holds no trained model
    run = json.loads((Path(model) / "run.json").read_text())
    publish_results(metrics, run, cfg)
    return {"run_id": run["run_id"], "metrics": metrics}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the SFT pipeline as a Prefect flow.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--evaluate-only", metavar="MODEL_FOLDER", help="only evaluate this trained model folder")
    args = parser.parse_args()
    if args.evaluate_only:
        sft_evaluate(args.evaluate_only, args.params, args.overrides)
    else:
        sft_pipeline(args.params, args.overrides)
