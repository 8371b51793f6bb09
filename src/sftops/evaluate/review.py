"""The test split reviewed: base against tuned on the same rows, the metrics metrics.json and MLflow carry
(overall and per source, with paired bootstrap CIs; how the sampled answers changed, held to the test split's
behaviour budget), and the tables reviewers read (every row's NLL under each model, the sampled answers side by
side)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from sftops.config import Config, EvaluateConfig
from sftops.evaluate.behaviour import degenerate_reasons
from sftops.evaluate.comparison import compare, compare_by_group
from sftops.evaluate.held_out import prompt_text
from sftops.evaluate.promotion import LENGTH_RATIO_TO_REFERENCE, data_checks, with_budget
from sftops.evaluate.sides import EvalSet, Side, behaviour_of
from sftops.evaluate.textmetrics import length_stats
from sftops.layout import STATS


def review_metrics(cfg: Config, test: EvalSet, base: Side, tuned: Side, identity: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: both models' summaries, the paired difference with its CI and the win rate, per source too,
    and what the promotion gate needs besides the numbers (the evaluation's identity, the data's self-checks)."""
    e = cfg.evaluate
    stats = (e.bootstrap_resamples, e.bootstrap_seed, e.confidence)
    overall = compare(base.scores, tuned.scores, *stats)
    sources = [r.get("source", "all") for r in test.rows]
    metrics: dict[str, Any] = {
        "test_rows": len(test.examples),
        "test_target_tokens": sum(c for _, c in tuned.scores),
        "generations": len(test.sample),
        "base": base.summary(),
        "tuned": tuned.summary(),
        "nll_improvement": overall["nll_improvement"],
        "nll_improvement_ci_low": overall["nll_improvement_ci_low"],
        "nll_improvement_ci_high": overall["nll_improvement_ci_high"],
        "confidence": e.confidence,
        "win_rate": overall["win_rate"],
        "behaviour": test_split_behaviour(e, test, base, tuned),
        **length_stats([r[0] for r in test.refs], "reference"),
        "per_source": compare_by_group(sources, base.scores, tuned.scores, *stats),
        "evaluation": identity,
        "data_checks": curated_data_checks(Path(cfg.paths.curated)),
    }
    for source, values in metrics["per_source"].items():
        picked = [i for i, r in enumerate(test.sample) if r.get("source", "all") == source]
        for who, side in (("base", base), ("tuned", tuned)):
            values.update(
                {
                    f"{who}_{name}": sum(v[i] for i in picked) / len(picked)
                    for name, v in side.generated.items()
                    if picked
                }
            )
    return metrics


def test_split_behaviour(e: EvaluateConfig, test: EvalSet, base: Side, tuned: Side) -> dict[str, Any]:
    """How the answers to the sampled test prompts changed, held to the test split's budget: its length against
    the references, which fine-tuning is meant to move the answers toward."""
    block = behaviour_of(e, test, base, tuned)
    return with_budget(
        block, LENGTH_RATIO_TO_REFERENCE, e.test_min_length_ratio, e.test_max_degenerate_rise, "test split"
    )


def curated_data_checks(curated: Path) -> dict[str, Any]:
    stats_file = curated / STATS
    passed, note = data_checks(json.loads(stats_file.read_text()) if stats_file.exists() else None)
    return {"passed": passed, "note": note}


def per_row_table(test: EvalSet, base: Side, tuned: Side) -> dict[str, list]:
    """Every test row: each model's response NLL, for the report's best and worst rows and for review."""
    return {
        "id": [r["id"] for r in test.rows],
        "source": [r.get("source", "all") for r in test.rows],
        "response_tokens": [c for _, c in tuned.scores],
        "base_nll": base.row_nll(),
        "tuned_nll": tuned.row_nll(),
    }


def generations_table(test: EvalSet, base: Side, tuned: Side, per_row: dict[str, list]) -> dict[str, list]:
    """The sampled prompts with both answers side by side, their scores, lengths, why an answer is degenerate
    (empty, loop, unstopped; blank when it is not) and response NLL."""
    row_of = {r["id"]: i for i, r in enumerate(test.rows)}
    sampled = [row_of[r["id"]] for r in test.sample]
    return {
        "id": [r["id"] for r in test.sample],
        "source": [r.get("source", "all") for r in test.sample],
        "prompt": [prompt_text(r["messages"]) for r in test.sample],
        "reference": [r[0] for r in test.refs],
        "other_references": [len(r) - 1 for r in test.refs],
        "base_output": base.texts(),
        "tuned_output": tuned.texts(),
        **{f"base_{name}": values for name, values in base.generated.items()},
        **{f"tuned_{name}": values for name, values in tuned.generated.items()},
        "base_new_tokens": [c.new_tokens for c in base.completions],
        "tuned_new_tokens": [c.new_tokens for c in tuned.completions],
        "base_degenerate": [r or "" for r in degenerate_reasons(base.completions, test.reachable)],
        "tuned_degenerate": [r or "" for r in degenerate_reasons(tuned.completions, test.reachable)],
        "base_nll": [per_row["base_nll"][i] for i in sampled],
        "tuned_nll": [per_row["tuned_nll"][i] for i in sampled],
    }


def review_rows(test: EvalSet, per_row: dict[str, list]) -> list[dict[str, Any]]:
    """Every test row as the report lists its best and worst: prompt, reference, both NLLs."""
    return [
        {
            "prompt": prompt_text(r["messages"]),
            "reference": r["messages"][-1]["content"],
            "base_nll": per_row["base_nll"][i],
            "tuned_nll": per_row["tuned_nll"][i],
        }
        for i, r in enumerate(test.rows)
    ]


def write_csv(path: Path, table: dict[str, list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(table)
        writer.writerows(zip(*table.values()))
