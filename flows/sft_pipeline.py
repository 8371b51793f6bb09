"""The SFT pipeline as a Prefect flow. DVC executes, Prefect orchestrates, MLflow registers:

    ingest -> format -> train -> evaluate
      -> export                               each a task running `dvc repro --single-item <stage>`: DVC decides
                                              whether the stage runs, is restored from its run-cache or is up to
                                              date; the task's state says which (Ran / Restored / Up to date)
    record                                    `dvc exp save` the workspace as a DVC experiment (params, dvc.lock,
                                              metrics in a git ref; nothing new if an experiment has this dvc.lock),
                                              `dvc exp push` only to the git remote record.push_to names; tag the
                                              registered version with the ref, where it can be restored and how
    promote                                   the promotion gate (tracking/registry.py promote): champion or challenger
    publish                                   artifacts: what DVC did, the data card, the review, the report link,
                                              the reviewers' feedback so far (review_feedback.py)

With `overrides` the five stages are one task, `dvc exp run --temp -S key=value ...`: a DVC experiment in a
temporary copy of the repository, so several variants run at once; then record, promote and publish as above.

    python flows/sft_pipeline.py                          # params.yaml, Prefect's temporary local server
    python flows/sft_pipeline.py --set train.learning_rate=1e-4 --set train.epochs=2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Without PREFECT_API_URL, Prefect starts a temporary local server; its 20 s default start-up limit is too
# short on a busy 2-core machine (seen in CI-like runs). A user's own setting wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# The library's log lines (sftops.*) in the Prefect UI, through Prefect's own logging configuration; a deployment
# sets it in prefect.yaml, this covers a run by hand. Set before Prefect configures logging on import.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sftops")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # dvc_steps, beside this file

import dvc_steps  # noqa: E402
import review_feedback  # noqa: E402
from prefect import flow, get_run_logger, runtime, task  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.client.schemas.objects import TaskRun  # noqa: E402
from prefect.concurrency.sync import concurrency  # noqa: E402
from prefect.states import Completed, State  # noqa: E402
from prefect.tasks import Task, exponential_backoff  # noqa: E402

from sftops.config import Config, load_config  # noqa: E402
from sftops.errors import SftopsError, TransientError  # noqa: E402
from sftops.evaluate.cost import cost_line  # noqa: E402
from sftops.layout import CARD, REPORT_FILE, RUN_FILE  # noqa: E402
from sftops.pipeline import STAGES, where  # noqa: E402
from sftops.redact import redact  # noqa: E402
from sftops.tracking import registry  # noqa: E402
from sftops.tracking.store import unreachable  # noqa: E402
from sftops.tracking.tags import ANYWHERE, RESTORABLE, RESTORE, RESTORE_WHERE, THIS_MACHINE  # noqa: E402

REGISTRY_LOCK = "sftops-registry"  # a Prefect global concurrency limit of 1 (make deploy creates it)


def retry_only_outages(task: Task, task_run: TaskRun, state: State) -> bool:
    """An outage (the tracking server, a remote, DVC's lock held by another run) may pass; a user mistake or a
    bug fails the same way on every try, so it is not retried."""
    try:
        state.result()
    except dvc_steps.DvcFailed as exc:
        return exc.transient
    except SftopsError:
        return False
    except Exception as exc:  # noqa: BLE001 - in-process calls to MLflow (record, promote)
        return isinstance(exc, TransientError) or unreachable(exc)
    return False


# Retries wait 10, 20, 40 s (jittered). A retried train stage resumes from its last checkpoint.
ON_OUTAGE: dict[str, Any] = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_only_outages,
    cache_policy=NO_CACHE,  # DVC is the cache: every run asks it
)


def _log(line: str) -> None:
    get_run_logger().info(line)


@task(**ON_OUTAGE)
def dvc_stage(stage: str, upstream: dict | None = None) -> State:
    """One stage through DVC; `upstream` (the previous stage's result) chains the tasks in the run's graph."""
    outcome = dvc_steps.repro(stage, Path.cwd(), _log)
    return Completed(name=outcome, message=f"DVC: {stage} {outcome.lower()}", data={"stage": stage, "outcome": outcome})


@task(**ON_OUTAGE)
def dvc_experiment(name: str, overrides: list[str]) -> State:
    """The five stages as DVC experiment <name> with these params, in a temporary workspace."""
    outcomes = dvc_steps.exp_run(name, overrides, Path.cwd(), _log)
    ran = sum(o == dvc_steps.RAN for o in outcomes.values())
    return Completed(name=f"Ran {ran} of {len(outcomes)}", data={"experiment": name, "outcomes": outcomes})


def _run_files(cfg: Config, rev: str | None, cwd: Path) -> tuple[dict, dict]:
    """The run.json of the model and metrics.json, from the workspace or as revision `rev` recorded them."""
    run_file, metrics_file = f"{cfg.paths.model}/{RUN_FILE}", cfg.paths.metrics
    if rev is None:
        return json.loads((cwd / run_file).read_text()), json.loads((cwd / metrics_file).read_text())
    return json.loads(dvc_steps.read_output(run_file, rev, cwd)), json.loads(dvc_steps.show(rev, metrics_file, cwd))


@task(**ON_OUTAGE)
def record(name: str, cfg: Config, in_workspace: bool, upstream: dict | None = None) -> State:
    """Record the run in git and DVC (on this machine; pushed to `record.push_to` when set), and tag its registered
    version with the record, where it can be restored and how (or with why there is no record)."""
    cwd = Path.cwd()
    rev, tags, reused = None, {}, False
    try:
        name, reused = save(name, cfg, in_workspace, cwd)
        ref = dvc_steps.exp_ref(name, cwd)
        rev = dvc_steps.git(["rev-parse", ref], cwd)
        tags = {"dvc.experiment": name, "git.ref": ref, "git.commit": rev}
        outs = dvc_steps.locked_outputs(dvc_steps.show(rev, "dvc.lock", cwd))
        tags.update({"dvc.curated_md5": outs[cfg.paths.curated]["md5"], "dvc.model_md5": outs[cfg.paths.model]["md5"]})
        versioned = True
    except dvc_steps.DvcFailed as exc:
        versioned, why = (
            False,
            f"{exc}; fix: run the flow in a git repository with `dvc init` done and its files committed",
        )
    run_info, metrics = _run_files(cfg, rev, cwd)
    if versioned and tags["dvc.curated_md5"] != registry.version_tags(run_info).get("data.curated_dvc_md5"):
        versioned, why = False, "the curated data in dvc.lock is not the data the model was trained on"
    if versioned:
        place = placement(name, rev, cfg.record.push_to, cwd)
        why = ("DVC found nothing new: the run is the one recorded earlier; " if reused else "") + place.pop("why")
        tags.update(place)
    tags.update({registry.VERSIONED: str(versioned).lower(), registry.VERSIONED_REASON: why[:5000]})
    if not versioned:
        get_run_logger().warning(
            f"sftops: model {run_info['registered_model']} v{run_info['version']}: data not versioned: {why}"
        )
    registry.record_version(run_info, tags)
    if in_workspace and runtime.deployment.id:
        # A deployment's clone must stay clean for the next run's `git checkout` of the pinned commit; the
        # experiment holds the params, dvc.lock and metrics, the DVC cache the outputs.
        dvc_steps.git(["reset", "--hard", "-q"], cwd)
        dvc_steps.git(["clean", "-fdq"], cwd)  # untracked, not ignored: the metrics file; never outputs or caches
    recorded = {"run": run_info, "metrics": metrics, "tags": tags, "versioned": versioned, "rev": rev, "name": name}
    return Completed(name="Recorded" if versioned else "Not versioned", message=why[:500], data=recorded)


def save(name: str, cfg: Config, in_workspace: bool, cwd: Path) -> tuple[str, bool]:
    """The experiment that records the run, and whether it was there already: a run in the workspace whose
    dvc.lock an experiment holds already (DVC found every stage up to date, or restored them all) points at that
    one rather than recording the same outputs again; otherwise the workspace is saved as experiment `name`. With
    overrides, `dvc exp run` has recorded it as `name`."""
    if not in_workspace:
        return name, False
    same = dvc_steps.experiment_with_lock(cwd)
    if same is not None:
        _log(f"dvc.lock is that of experiment {same}: the run is recorded there already, nothing new is saved")
        return same.rsplit("/", 1)[-1], True
    dvc_steps.exp_save(name, ["dvc.lock", cfg.paths.metrics], cwd, _log)
    return name, False


def placement(name: str, rev: str, push_to: str | None, cwd: Path) -> dict[str, str]:
    """Where experiment `name` (at commit `rev`) can be restored, the command that does it there, and why: in this
    repository on this machine (its refs and DVC cache), or, pushed to git remote `push_to` with its outputs on
    a DVC remote a clone knows, anywhere. Nothing is pushed unless `record.push_to` names a remote."""
    here = {
        RESTORABLE: THIS_MACHINE,
        RESTORE_WHERE: f"the repository {cwd} on {socket.gethostname()}",
        RESTORE: f"cd {shlex.quote(str(cwd))} && dvc exp apply {name}",
    }
    local = "the experiment's ref in this repository, its outputs in this machine's DVC cache"
    if push_to is None:
        return {**here, "why": f"{local}; nothing pushed (record.push_to is null)"}
    url = dvc_steps.git_remote_url(push_to, cwd)
    if url is None:
        return {
            **here,
            "why": f"{local}; not pushed: record.push_to names git remote {push_to!r}, which this "
            "repository does not have (git remote -v lists those it has)",
        }
    try:
        dvc_steps.exp_push(name, push_to, cwd, _log)
    except dvc_steps.DvcFailed as exc:
        get_run_logger().warning(f"sftops: {exc}; the run stays recorded on this machine only")
        return {
            **here,
            "why": f"{local}; pushing failed ({exc}); fix: make the remote reachable, then "
            f"`dvc exp push {push_to} {name}`",
        }
    dvc_remote = dvc_steps.committed_dvc_remote(rev, cwd)
    if dvc_remote is None or dvc_remote != dvc_steps.dvc_remote(cwd):
        return {
            **here,
            "why": f"the experiment's ref pushed to git remote {push_to!r}; its outputs are in this "
            "machine's DVC cache only: the recorded .dvc/config names no default DVC remote (fix: "
            "dvc remote add -d <name> <url>, and commit .dvc/config)",
        }
    shown = redact(url)
    folder = f"sftops-{name}"
    return {
        RESTORABLE: ANYWHERE,
        RESTORE_WHERE: f"any machine that can read git remote {shown} and DVC remote {dvc_remote!r}",
        RESTORE: (
            f"git clone {shlex.quote(shown)} {folder} && cd {folder} && dvc exp pull origin {name} && "
            f"dvc exp apply {name}"
        ),
        "why": f"the experiment's ref pushed to git remote {push_to!r} ({shown}), its outputs to DVC remote "
        f"{dvc_remote!r}",
    }


@task(**ON_OUTAGE)
def promote(recorded: dict, cfg: Config) -> State:
    """The promotion gate, one flow at a time per registry: two variants deciding at once would both see the old
    champion."""
    from sftops.evaluate.champion import measurer

    with concurrency(REGISTRY_LOCK, occupy=1, strict=False):
        # A champion with no result on this run's test split is measured on it first, with this run's settings.
        decision = registry.promote(
            recorded["run"],
            recorded["metrics"],
            cfg.evaluate.primary_metric,
            cfg.evaluate.promotion_margin,
            measurer(cfg),
            cfg.tracking.require_review,
        )
    return Completed(name=decision.alias.capitalize(), message=decision.reason, data=decision.as_dict())


def data_card(cfg: Config, rev: str | None = None) -> str:
    path = f"{cfg.paths.curated}/{CARD}"
    return dvc_steps.read_output(path, rev, Path.cwd()) if rev else Path(path).read_text(encoding="utf-8")


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
    cost = cost_line(metrics.get("cost"), promotion)  # what the run cost, per 0.1 nats over base and champion
    return (
        f"## SFT results ({metrics['test_rows']} test rows)\n\n{headline}\n\n"
        f"Registry: **{promotion['alias']}**: {promotion['reason']}\n\n"
        + (f"Cost: {cost}\n\n" if cost else "")
        + f"Report: `{metrics['report']}` (also in the MLflow evaluation run's artifacts, eval/report.html)\n\n"
        f"| metric | base | tuned |\n|---|---|---|\n{rows}\n\n{places}\n"
    )


def metrics_table(metrics: dict) -> list[dict[str, Any]]:
    return [
        {"metric": key, "base": metrics["base"][key], "tuned": metrics["tuned"][key]}
        for key in metrics["tuned"]
        if key in metrics["base"]
    ]


def record_markdown(outcomes: dict[str, str], recorded: dict) -> str:
    rows = "\n".join(f"| {stage} | {outcome} |" for stage, outcome in outcomes.items())
    tags = recorded["tags"]
    versioned = (
        f"Recorded as DVC experiment `{tags['dvc.experiment']}` (`{tags['git.ref']}`, commit "
        f"`{tags['git.commit'][:12]}`): {tags[registry.VERSIONED_REASON]}"
        if recorded["versioned"]
        else f"**Not versioned**: {tags[registry.VERSIONED_REASON]}"
    )
    restore = f"\n\nRestore its data and model in {tags[RESTORE_WHERE]}: `{tags[RESTORE]}`" if RESTORE in tags else ""
    return f"## What DVC did\n\n| stage | DVC |\n|---|---|\n{rows}\n\n{versioned}{restore}\n"


def report_link(run: dict, metrics: dict, cfg: Config) -> str:
    """The HTML report in the evaluation's MLflow run, on the server where reviewers can open it; the local file
    otherwise."""
    if urlsplit(run.get("tracking_uri", "")).scheme in {"http", "https"}:
        link = registry.report_link(run, metrics, cfg.evaluate.primary_metric)
        if link:
            return link
    return (Path(cfg.paths.reports) / REPORT_FILE).resolve().as_uri()


def publish(outcomes: dict[str, str], recorded: dict, decision: dict, cfg: Config) -> None:
    run, metrics = (
        recorded["run"],
        {**recorded["metrics"], "promotion": decision, "report": str(Path(cfg.paths.reports) / REPORT_FILE)},
    )
    create_markdown_artifact(
        markdown=record_markdown(outcomes, recorded),
        key="sft-dvc",
        description="what DVC did, where the run is recorded",
    )
    create_markdown_artifact(
        markdown=data_card(cfg, recorded["rev"]), key="sft-data-card", description="what the format stage did"
    )
    metrics["cost"] = registry.run_cost(run, metrics)  # metrics.json leaves clock figures out; run.json has them
    create_markdown_artifact(markdown=metrics_markdown(metrics, cfg), key="sft-metrics", description="base vs tuned")
    create_table_artifact(
        table=metrics_table(metrics), key="sft-metrics-table", description="test metrics, base vs tuned"
    )
    create_link_artifact(
        link=report_link(run, recorded["metrics"], cfg),
        link_text=REPORT_FILE,
        key="sft-report",
        description=f"the review of MLflow run {run['run_id']}",
    )
    review_feedback.publish_feedback(run, cfg.evaluate)


def experiment_name() -> str:
    """A name DVC accepts and a reader can place: the flow run's own name and the time."""
    when = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{runtime.flow_run.name or 'run'}-{when}"


@flow(name="sft-pipeline", log_prints=True)
def sft_pipeline(overrides: list[str] | None = None, experiment: str | None = None) -> dict:
    """The pipeline on params.yaml (with `overrides`: as a DVC experiment on those params), recorded and promoted."""
    overrides = overrides or []
    cfg = load_config("params.yaml", overrides)
    name = experiment or experiment_name()
    progress = create_progress_artifact(0.0, key="sft-progress", description="pipeline steps done (%)")
    if overrides:
        upstream = dvc_experiment.submit(name, overrides)
        outcomes = upstream.result()["outcomes"]
    else:
        upstream, outcomes = None, {}
        for done, stage in enumerate(STAGES, 1):
            upstream = dvc_stage.with_options(name=stage).submit(stage, upstream)
            outcomes[stage] = upstream.result()["outcome"]
            update_progress_artifact(progress, 15.0 * done)
    recording = record.submit(name, cfg, not overrides, upstream)
    recorded = recording.result()
    update_progress_artifact(progress, 80.0)
    decision = promote.submit(recording, cfg).result()
    publish(outcomes, recorded, decision, cfg)
    update_progress_artifact(progress, 100.0)
    run = recorded["run"]
    print(
        json.dumps(
            {
                "mlflow_run_id": run["run_id"],
                "model_version": run["version"],
                "registry": decision["alias"],
                "dvc_experiment": recorded["name"],
                "dvc": outcomes,
            },
            indent=2,
        )
    )
    return {
        "run_id": run["run_id"],
        "version": run["version"],
        "experiment": recorded["name"],
        "outcomes": outcomes,
        "decision": decision,
        "versioned": recorded["versioned"],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the SFT pipeline as a Prefect flow (DVC runs the stages).")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run as a DVC experiment with this param changed (repeatable)",
    )
    parser.add_argument(
        "--name", default=None, help="the DVC experiment's name (default: the flow run's name and time)"
    )
    args = parser.parse_args()
    try:  # a mistake in params.yaml or a --set: its lines and exit code 2, before Prefect starts
        load_config("params.yaml", args.overrides)
    except SftopsError as exc:
        print(f"sftops: {exc}", file=sys.stderr)
        sys.exit(2)
    sft_pipeline(args.overrides, args.name)
