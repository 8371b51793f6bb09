"""The flows registry events start. flows/registry_events.py turns MLflow's webhooks into Prefect events; the
deployment triggers in prefect.yaml run these on them, in the deployment's clone (its params.yaml):

    sftops.model-version.created    evaluate-version: evaluate the version (base and tuned on the champion's test
                                    split, every suite) when it has no evaluation; a version the pipeline's train
                                    stage registered gets its evaluation from the pipeline, so nothing is done
    sftops.model-version.approved   promote-version: `sftops review promote models:/NAME/VERSION`, the promotion
                                    gate applied again with the reviewer's verdict (one promotion at a time)

    python flows/registry_flows.py evaluate models:/NAME/VERSION        # the same, by hand
    python flows/registry_flows.py promote models:/NAME/VERSION
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sftops")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefect import flow, get_run_logger  # noqa: E402
from prefect.concurrency.sync import concurrency  # noqa: E402
from prefect.states import Completed, Failed, State  # noqa: E402

from sftops.config import load_config  # noqa: E402
from sftops.tracking.store import answering, tracking_uri  # noqa: E402

REGISTRY_LOCK = "sftops-registry"  # as flows/sft_pipeline.py: one promotion at a time per registry


@flow(name="evaluate-version", log_prints=True)
def evaluate_version(model_uri: str) -> State:
    """Evaluate a registered version when it has no evaluation (stages/evaluate.py evaluate_version)."""
    from sftops.stages.evaluate import evaluate_version as evaluate

    result = evaluate(load_config("params.yaml"), model_uri, answering(tracking_uri()))
    get_run_logger().info(f"{model_uri}: {result.outcome}: {result.reason}")
    return Completed(name=result.outcome.capitalize(), message=result.reason, data=asdict(result))


@flow(name="promote-version", log_prints=True)
def promote_version(model_uri: str) -> State:
    """The promotion gate on an approved version, as `sftops review promote` applies it."""
    command = [sys.executable, "-m", "sftops", "review", "promote", model_uri]
    with concurrency(REGISTRY_LOCK, occupy=1, strict=False):
        done = subprocess.run(command, capture_output=True, text=True)
    logger = get_run_logger()
    for line in (done.stdout + done.stderr).splitlines():
        logger.info(line)
    said = (done.stdout.strip() or done.stderr.strip() or "no output").splitlines()[-1]
    if done.returncode != 0:
        return Failed(message=f"sftops review promote {model_uri} failed ({done.returncode}): {said}")
    return Completed(name="Promotion applied", message=said)


if __name__ == "__main__":
    what, uri = sys.argv[1:3] if len(sys.argv) == 3 else ("", "")
    if what not in {"evaluate", "promote"}:
        sys.exit("usage: python flows/registry_flows.py evaluate|promote models:/NAME/VERSION")
    state = (evaluate_version if what == "evaluate" else promote_version)(uri, return_state=True)
    print(f"{state.name}: {state.message}")
    sys.exit(0 if state.is_completed() else 1)
