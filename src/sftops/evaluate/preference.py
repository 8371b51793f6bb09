"""Reviewers' verdicts on the answers, counted: each reviewer's `preference` (tuned | base | tie) of a prompt's two
answers, the share of labelled prompts where the tuned answer won (a tie counts half) with its bootstrap interval,
and the prompts where it lost with the reviewers' reasons. Pure: labelled rows in, figures out; reading them from
MLflow is tracking/traces.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sftops.evaluate.comparison import mean_ci

# What a reviewer's preference scores for the tuned model: it won, tied (half a win) or lost.
SCORES = {"tuned": 1.0, "tie": 0.5, "base": 0.0}


@dataclass(frozen=True)
class LabelledRow:
    """One answered prompt of a version's evaluations (one trace), with its reviewers' preferences: the latest
    valid one of each reviewer, {"value", "rationale", "reviewer"}."""

    trace_id: str
    suite: str
    row_id: str
    prompt: str
    reference: str
    base: str
    tuned: str
    preferences: list[dict[str, str]]


def merged(rows: Sequence[LabelledRow]) -> list[LabelledRow]:
    """One row per prompt (suite, row id), newest first in, first kept: a prompt answered in several evaluations
    of the version counts once, with each reviewer's label from the newest trace they labelled."""
    out: dict[tuple[str, str], LabelledRow] = {}
    for row in rows:
        key = (row.suite, row.row_id)
        if key not in out:
            out[key] = row
            continue
        seen = {p["reviewer"] for p in out[key].preferences}
        extra = [p for p in row.preferences if p["reviewer"] not in seen]
        if extra:
            kept = out[key]
            out[key] = LabelledRow(**{**kept.__dict__, "preferences": [*kept.preferences, *extra]})
    return list(out.values())


def row_score(row: LabelledRow) -> float | None:
    """The mean score of the row's preferences (tuned 1, tie 0.5, base 0); None when no reviewer gave one of those
    three values."""
    scores = [SCORES[p["value"].strip().lower()] for p in row.preferences if p["value"].strip().lower() in SCORES]
    return sum(scores) / len(scores) if scores else None


def lost(rows: Sequence[LabelledRow]) -> list[LabelledRow]:
    """The rows where the tuned answer lost: their reviewers preferred the base answer more often than the tuned
    one (score below 0.5)."""
    return [r for r in rows if (score := row_score(r)) is not None and score < 0.5]


def summarize(rows: Sequence[LabelledRow], resamples: int, seed: int, confidence: float) -> dict[str, Any]:
    """Rows labelled of all rows, each label's count, labels with another value (not counted), the win rate of
    tuned over base over the labelled rows (each row's mean score; a tie counts half) with its bootstrap interval
    over rows, and the lost rows with the reviewers' rationales."""
    prompts = merged(rows)
    scored = [(r, s) for r in prompts if (s := row_score(r)) is not None]
    values = [p["value"].strip().lower() for r in prompts for p in r.preferences]
    summary: dict[str, Any] = {
        "rows": len(prompts),
        "labelled": len(scored),
        "labels": {v: values.count(v) for v in SCORES},
        "other_labels": sum(v not in SCORES for v in values),
        "reviewers": sorted({p["reviewer"] for r in prompts for p in r.preferences}),
        "confidence": confidence,
        "ties": "count half a win",
    }
    if scored:
        rate, low, high = mean_ci([s for _, s in scored], resamples, seed, confidence)
        summary.update({"win_rate": rate, "win_rate_ci_low": low, "win_rate_ci_high": high})
    summary["lost"] = [
        {
            "suite": r.suite,
            "row_id": r.row_id,
            "trace_id": r.trace_id,
            "prompt": r.prompt,
            "base": r.base,
            "tuned": r.tuned,
            "rationales": [p for p in r.preferences if p["rationale"]],
        }
        for r in lost(prompts)
    ]
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as a reviewer reads it in a terminal (markdown: the Prefect artifact shows the same)."""
    level = round(100 * summary["confidence"])
    lines = [
        f"Rows labelled: {summary['labelled']} of {summary['rows']} (reviewers: "
        f"{', '.join(summary['reviewers']) or 'none'})"
    ]
    counts = summary["labels"]
    lines.append(
        f"Preferences: tuned {counts['tuned']}, base {counts['base']}, tie {counts['tie']}"
        + (f" ({summary['other_labels']} other values not counted)" if summary["other_labels"] else "")
    )
    if "win_rate" in summary:
        lines.append(
            f"Win rate of tuned over base: {summary['win_rate']:.3f} ({level}% bootstrap CI "
            f"[{summary['win_rate_ci_low']:.3f}, {summary['win_rate_ci_high']:.3f}]; a tie counts half a win)"
        )
    else:
        lines.append("Win rate: no row labelled yet (add `preference` feedback in the MLflow Traces view)")
    lines.append(f"Rows where tuned lost: {len(summary['lost'])}")
    for row in summary["lost"]:
        reasons = "; ".join(f"{p['reviewer']}: {p['rationale']}" for p in row["rationales"]) or "(no rationale)"
        lines.append(f"- [{row['suite']}] {row['prompt'][:120]!r}: {reasons}")
    return lines
