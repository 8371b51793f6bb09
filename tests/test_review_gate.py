"""The human verdict in the promotion gate. Pure: the review state read from a version's tags, and the decision
with it (a rejected version never becomes champion; with tracking.require_review only an approved one does; a
version the automatic gate refuses stays refused). With a real MLflow store: a version registered and evaluated
earlier is promoted again from what MLflow recorded (`sftops review promote`), a verdict set with `sftops review
approve|reject`, and `sftops review status` lists what waits for review and a champion alias set by hand."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import trained_qa
from sftops.cli import main
from sftops.evaluate.promotion import CHALLENGER, CHAMPION, Champion, decide
from sftops.stages.evaluate import run_evaluate
from sftops.tracking import registry
from sftops.tracking.review_state import APPROVED, PENDING, REJECTED, REVIEW, REVIEW_BY, REVIEW_REASON, review_state


def test_the_review_state_is_read_from_the_version_tags():
    assert review_state({}) == PENDING
    assert review_state({REVIEW: "approved", REVIEW_BY: "alice"}) == APPROVED
    assert review_state({REVIEW: " Rejected "}) == REJECTED  # as typed in the UI's tag editor
    assert review_state({REVIEW: "looks fine"}) == PENDING  # no verdict approves nothing
    assert review_state({REVIEW_BY: "alice", REVIEW_REASON: "why"}) == PENDING


# A version that beats the champion by 0.5 nats (the automatic gate passes it), and one that does not.
BETTER = ("nll", 1.0, "key", "2", Champion("1", 1.5, "key"), 0.0)
WORSE = ("nll", 2.0, "key", "2", Champion("1", 1.5, "key"), 0.0)


@pytest.mark.parametrize("require_review", [False, True])
def test_a_rejected_version_never_becomes_champion(require_review):
    automatic = decide(*BETTER)
    assert automatic.alias == CHAMPION and automatic.passed_gate
    rejected = decide(*BETTER, review=(REJECTED, "by bob: answers read badly"), require_review=require_review)
    assert rejected.alias == CHALLENGER and rejected.passed_gate and rejected.review == REJECTED
    assert (
        rejected.reason
        == f"passed the gate ({automatic.reason}); rejected in review by bob: answers read badly: not promoted"
    )


def test_with_require_review_only_an_approved_version_becomes_champion():
    automatic = decide(*BETTER)
    pending = decide(*BETTER, require_review=True)
    assert pending.alias == CHALLENGER and pending.passed_gate and pending.review == PENDING
    assert pending.reason == (
        f"passed the gate ({automatic.reason}); awaiting review (tracking.require_review): not promoted until approved"
    )
    approved = decide(*BETTER, review=(APPROVED, "by alice: fine"), require_review=True)
    assert approved.alias == CHAMPION and approved.reason == f"{automatic.reason}; approved in review by alice: fine"
    # Without the requirement a version nobody reviewed is decided by the automatic gate alone, as before.
    assert decide(*BETTER, require_review=False) == automatic


def test_an_approval_does_not_overrule_the_automatic_gate():
    refused = decide(*WORSE)
    assert refused.alias == CHALLENGER and not refused.passed_gate
    approved = decide(*WORSE, review=(APPROVED, "by alice: fine"), require_review=True)
    assert (approved.alias, approved.reason, approved.passed_gate) == (CHALLENGER, refused.reason, False)
    rejected = decide(*WORSE, review=(REJECTED, "by bob: no"))
    assert rejected.alias == CHALLENGER and rejected.reason == f"{refused.reason}; also rejected in review by bob: no"


@pytest.fixture
def evaluated(project_folder, tiny_model):
    """A version trained, evaluated (its gate inputs logged on the evaluation run) and recorded as versioned, as
    the pipeline flow leaves it before its promote step: (config, run record, metrics.json)."""
    cfg, run = trained_qa(
        tiny_model,
        evaluate={"num_generations": 2, "max_new_tokens": 4, "parity_rows": 0, "test_min_length_ratio": None},
    )
    run_evaluate(cfg)
    record = asdict(run)
    registry.record_version(record, {registry.VERSIONED: "true", registry.VERSIONED_REASON: "recorded by the test"})
    return cfg, record, json.loads(Path(cfg.paths.metrics).read_text())


def review(*args: str) -> int:
    return main(["review", *args])


def test_a_verdict_moves_the_champion_through_review_promote_and_status_reports_what_waits(
    evaluated, capsys, monkeypatch
):
    cfg, record, metrics = evaluated
    client, uri = MlflowClient(), f"models:/tiny/{record['version']}"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # who a client reviews as (a local store checks nothing)

    # The flow's promote step with tracking.require_review: the version passes the gate and waits.
    waiting = registry.promote(record, metrics, "nll", cfg.evaluate.promotion_margin, require_review=True)
    assert waiting.alias == CHALLENGER and waiting.passed_gate and "awaiting review" in waiting.reason
    assert review("status", "--name", "tiny") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "tiny: 1 version passed the gate and await review"
    assert out[1] == f"  v{record['version']}  challenger: {waiting.reason}"

    # A champion alias moved by hand onto the waiting version is reported, with the gate's decision.
    client.set_registered_model_alias("tiny", CHAMPION, record["version"])
    assert review("status", "--name", "tiny") == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"champion -> v{record['version']}: set by hand on a version the gate refused (challenger: {waiting.reason})"
    )
    client.delete_registered_model_alias("tiny", CHAMPION)

    # Approved, then promoted again from what MLflow recorded (no metrics.json needed): champion.
    Path(cfg.paths.metrics).unlink()
    assert review("approve", uri, "--reason", "answers read fine") == 0
    tags = client.get_model_version("tiny", record["version"]).tags
    assert (tags[REVIEW], tags[REVIEW_BY], tags[REVIEW_REASON]) == ("approved", "alice", "answers read fine")
    assert review("promote", uri, "--set", "tracking.require_review=true") == 0
    decided = client.get_model_version("tiny", record["version"]).tags
    assert str(client.get_model_version_by_alias("tiny", CHAMPION).version) == record["version"]
    assert decided["promotion.decision"] == CHAMPION and decided["promotion.gate"] == "passed"
    assert decided["promotion.reason"].endswith("; approved in review by alice: answers read fine")
    assert capsys.readouterr().out.splitlines()[-1] == f"{uri}: champion: {decided['promotion.reason']}"
    promoted = json.loads(Path(client.download_artifacts(record["run_id"], "eval/promotion.json", ".")).read_text())
    assert promoted["value"] == metrics["tuned"]["nll"]  # decided from the recorded evaluation
    assert review("status", "--name", "tiny") == 0
    assert capsys.readouterr().out.splitlines() == [
        "tiny: 0 versions passed the gate and await review",
        "tiny: the champion alias is where the gate put it (or there is none)",
    ]

    # Rejected (require_review off): promoted again, it is refused; the alias it holds is reported.
    assert review("reject", uri, "--reason", "rewrites emails as one word") == 0
    assert review("promote", uri) == 0
    decided = client.get_model_version("tiny", record["version"]).tags
    assert decided["promotion.decision"] == CHALLENGER and decided["promotion.gate"] == "passed"
    assert "rejected in review by alice: rewrites emails as one word: not promoted" in decided["promotion.reason"]
    assert review("status", "--name", "tiny") == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"champion -> v{record['version']}: a version rejected in review by alice: rewrites emails as one word"
    )

    assert review("approve", "models:/tiny/99", "--reason", "x") == 2  # no such version: one line, no traceback
    assert review("approve", "tiny/1", "--reason", "x") == 2
