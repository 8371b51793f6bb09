"""The SFT pipeline as a Prefect flow: the same four library stages that `dvc repro` runs, as tasks.

    python flows/sft_pipeline.py                      # params.yaml, Prefect's temporary local server
    python flows/sft_pipeline.py --set train.max_steps=10
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# Without PREFECT_API_URL, Prefect starts a temporary local server; its 20 s default start-up limit is too
# short on a busy 2-core machine (seen in CI-like runs). A user's own setting wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from sftops.config import Config, isolate_outputs, load_config  # noqa: E402
from sftops.data.card import CARD  # noqa: E402
from sftops.pipeline import STAGES, where  # noqa: E402

# Stage outputs live on disk (data/, models/); the tasks pass the typed config, never large objects.
# Caching by real inputs comes with the operations work; until then every run computes afresh.
ingest = task(STAGES["ingest"], name="ingest", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
format_data = task(STAGES["format"], name="format", cache_policy=NO_CACHE)
train = task(STAGES["train"], name="train", cache_policy=NO_CACHE)
evaluate = task(STAGES["evaluate"], name="evaluate", cache_policy=NO_CACHE)


def data_card(cfg: Config) -> str:
    return (Path(cfg.paths.curated) / CARD).read_text(encoding="utf-8")


def metrics_markdown(metrics: dict, cfg: Config) -> str:
    """Headline numbers, the promotion decision and where the report is."""
    rows = "\n".join(
        f"| {key} | {metrics['base'][key]:.4f} | {metrics['tuned'][key]:.4f} |" for key in metrics["tuned"] if key in metrics["base"]
    )
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


@flow(name="sft-pipeline", log_prints=True)
def sft_pipeline(params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    cfg = isolate_outputs(load_config(params, overrides or []), overrides or [])
    ingest(cfg)
    format_data(cfg)
    create_markdown_artifact(markdown=data_card(cfg), key="sft-data-card", description="what the format stage did")
    run = train(cfg)
    metrics = evaluate(cfg)
    create_markdown_artifact(markdown=metrics_markdown(metrics, cfg), key="sft-metrics", description="base vs tuned")
    print(json.dumps({"mlflow_run_id": run["run_id"], "model_version": run["version"], **where(cfg)}, indent=2))
    return {"run_id": run["run_id"], "metrics": metrics}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the SFT pipeline as a Prefect flow.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    sft_pipeline(args.params, args.overrides)
