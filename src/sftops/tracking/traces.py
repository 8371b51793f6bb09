"""An evaluation's answers as MLflow traces, where reviewers label them: one trace per prompt answered (the test
split's sample and every suite's), linked to the evaluation run (the run active when it is logged) and to the
version's logged model, with the prompt and reference as inputs, the base and tuned answers side by side as
outputs (and the champion's, where it answered the same prompt), every per-answer metric, and tags to filter by.
Reviewers add `preference` feedback in the Traces view (docs/review.md); reading it back is `labelled_rows`."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow

from sftops.evaluate.preference import LabelledRow

log = logging.getLogger(__name__)

TEST_SUITE = "test"  # the `suite` tag of the test split's traces
PREFERENCE = "preference"  # the assessment a reviewer adds: tuned | base | tie, with a rationale
# Trace tags a reviewer filters by in the Traces view (tags.suite = 'general', tags.worsened = 'true').
SUITE, SOURCE, WORSENED, DEGENERATE, ROW_ID, VERSION = "suite", "source", "worsened", "degenerate", "row_id", "version"
NOT_DEGENERATE = "no"


def answer_metrics(table: dict[str, list], i: int) -> dict[str, dict[str, Any]]:
    """Row i's per-answer figures, base beside tuned: {"chrf": {"base": .., "tuned": ..}, "nll": {...}, ...}."""
    names = [c.removeprefix("tuned_") for c in table if c.startswith("tuned_") and c != "tuned_output"]
    return {
        name: {"base": table[f"base_{name}"][i], "tuned": table[f"tuned_{name}"][i]}
        for name in names
        if f"base_{name}" in table
    }


def trace_tags(table: dict[str, list], i: int, suite: str, version: str) -> dict[str, str]:
    """What a reviewer filters by: the suite (`test` for the test split), the row's data source, whether the tuned
    model finds the row's reference less likely than the base model did (response NLL rose: `worsened`), and why
    the tuned answer is degenerate (empty, loop, unstopped; `no` when it is not)."""
    worsened = table["tuned_nll"][i] > table["base_nll"][i]
    return {
        SUITE: suite,
        SOURCE: str(table["source"][i]) if "source" in table else suite,
        WORSENED: str(worsened).lower(),
        DEGENERATE: (table["tuned_degenerate"][i] if "tuned_degenerate" in table else "") or NOT_DEGENERATE,
        ROW_ID: str(table["id"][i]),
        VERSION: version,
    }


def log_answer_traces(
    tables: dict[str, dict[str, list]],
    version: str,
    model_id: str | None,
    champion: dict[str, dict[str, str]] | None = None,
) -> int:
    """One trace per row of each generations table ({suite name: table}, the test split's under "test"), in the
    active run's experiment and linked to it; `champion`: per suite, the champion's answer by row id. A table with
    one model's answers only (a champion measured alone for the gate) has no pair to judge and logs none. Returns
    how many traces were logged."""
    champion = champion or {}
    started, count = time.perf_counter(), 0
    with _fresh_trace_ids():
        for suite, table in tables.items():
            if "base_output" not in table:  # a champion measured alone for the gate: no pair of answers to compare
                continue
            for i in range(len(table["id"])):
                _log_one(table, i, suite, version, model_id, champion.get(suite, {}))
                count += 1
    mlflow.flush_trace_async_logging()  # a no-op unless async trace logging is on
    log.info("logged %d answer traces in %.1f s", count, time.perf_counter() - started)
    return count


@contextmanager
def _fresh_trace_ids() -> Iterator[None]:
    """OpenTelemetry draws trace ids from Python's global random, which training and evaluation seed: two evaluations
    in two processes would draw the same ids, and the second would overwrite the first's traces (labels and all).
    The ids come from fresh entropy here; the seeded state is put back after, so nothing downstream changes."""
    state = random.getstate()
    random.seed(os.urandom(32))
    try:
        yield
    finally:
        random.setstate(state)


def _log_one(
    table: dict[str, list], i: int, suite: str, version: str, model_id: str | None, champion: dict[str, str]
) -> None:
    prompt, tuned = table["prompt"][i], table["tuned_output"][i]
    outputs = {"base": table["base_output"][i], "tuned": tuned}
    if table["id"][i] in champion:
        outputs["champion"] = champion[table["id"][i]]
    with mlflow.start_span(name=suite, span_type="LLM") as span:
        span.set_inputs({"prompt": prompt, "reference": table["reference"][i]})
        span.set_outputs(outputs)
        span.set_attribute("metrics", answer_metrics(table, i))
        mlflow.update_current_trace(
            tags=trace_tags(table, i, suite, version),
            model_id=model_id,
            request_preview=prompt[:1000],
            response_preview=f"tuned: {tuned[:480]} | base: {outputs['base'][:480]}",
        )


def labelled_rows(store: str, model_id: str) -> list[LabelledRow]:
    """Every answer trace linked to the logged model, newest first, each with the valid `preference` assessments
    reviewers gave it (an assessment a reviewer edited is replaced by the edit: MLflow marks the old one invalid)."""
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(store)
    experiments = [e.experiment_id for e in MlflowClient(store).search_experiments()]
    traces = mlflow.search_traces(
        locations=experiments,
        # the model's answer traces only (a served model's own traces carry no suite tag)
        filter_string=f"metadata.`mlflow.modelId` = '{model_id}' AND tags.{SUITE} != ''",
        order_by=["timestamp_ms DESC"],
        return_type="list",
    )
    return [_row(t) for t in traces]


def _row(trace) -> LabelledRow:
    span = trace.data.spans[0]
    inputs, outputs = span.inputs or {}, span.outputs or {}
    tags = trace.info.tags
    latest: dict[str, dict[str, str]] = {}
    for a in sorted(trace.info.assessments or [], key=lambda a: a.create_time_ms or 0):
        if a.name == PREFERENCE and a.valid is not False and a.feedback is not None:
            reviewer = a.source.source_id if a.source else "unknown"
            latest[reviewer] = {"value": str(a.feedback.value), "rationale": a.rationale or "", "reviewer": reviewer}
    return LabelledRow(
        trace.info.trace_id,
        tags.get(SUITE, ""),
        tags.get(ROW_ID, ""),
        inputs.get("prompt", ""),
        inputs.get("reference", ""),
        outputs.get("base", ""),
        outputs.get("tuned", ""),
        list(latest.values()),
    )
