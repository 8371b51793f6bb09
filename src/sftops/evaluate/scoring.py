"""One model's results on a set of rows: the generation sample (distinct prompts, all their references), each
answer scored against its closest reference, and the summary of NLL and generation metrics that metrics.json
and MLflow carry."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sftops.data.curate import prompt_key
from sftops.evaluate.generation import Completion
from sftops.evaluate.textmetrics import chrf, extracted_match, length_stats, rouge_l
from sftops.train.loss import mean_nll


def generation_sample(rows: list[dict[str, Any]], n: int) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Up to n rows with distinct prompts, in a stable order spread over the test split (sorted by row id),
    each with every reference answer the test split has for its prompt."""
    refs: dict[str, list[str]] = {}
    first: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["id"]):
        key = prompt_key(row["messages"])
        refs.setdefault(key, []).append(row["messages"][-1]["content"])
        first.setdefault(key, row)
    keys = list(first)[:n]
    return [first[k] for k in keys], [refs[k] for k in keys]


def best(score: Callable[[str, str], float], output: str, references: list[str]) -> float:
    """A prompt with several valid answers is scored against the closest one."""
    return max(score(output, r) for r in references)


def row_scores(outputs: list[str], refs: list[list[str]], extraction: str = "normalized") -> dict[str, list[float]]:
    """Per generated answer: exact match (of the answers extracted by the rule), ROUGE-L F1 and chrF against
    its closest reference."""

    def em(o: str, r: str) -> float:
        return extracted_match(o, r, extraction)

    return {
        "exact_match": [best(em, o, r) for o, r in zip(outputs, refs)],
        "rouge_l": [best(rouge_l, o, r) for o, r in zip(outputs, refs)],
        "chrf": [best(chrf, o, r) for o, r in zip(outputs, refs)],
    }


def summarise(
    scores: list[tuple[float, int]], per_row: dict[str, list[float]], completions: list[Completion]
) -> dict[str, float]:
    nll = mean_nll(scores)
    out = {"nll": nll, "perplexity": math.exp(nll)}
    for name, values in per_row.items():
        if values:
            out[name] = sum(values) / len(values)
    if completions:
        out.update(length_stats([c.text for c in completions], "response"))
        out["response_tokens_mean"] = sum(c.new_tokens for c in completions) / len(completions)
        out["stopped_rate"] = sum(c.stopped for c in completions) / len(completions)
    return out
