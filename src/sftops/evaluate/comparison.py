"""Base vs tuned on the same test rows: the difference of token-weighted mean NLL with a paired bootstrap
confidence interval, and the per-row win rate; overall and per data source. The same paired resampling gives the
intervals of a mean change (a text metric, a share of answers) and of a ratio of means (answer lengths)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

Scores = Sequence[tuple[float, int]]  # (summed response NLL, response tokens) per row


def _check_paired(base: Scores, tuned: Scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(base) != len(tuned) or not base:
        raise ValueError(f"paired comparison needs the same non-empty rows (got {len(base)} and {len(tuned)})")
    base_sum = np.array([s for s, _ in base], dtype=np.float64)
    tuned_sum = np.array([s for s, _ in tuned], dtype=np.float64)
    tokens = np.array([c for _, c in base], dtype=np.float64)
    if [c for _, c in base] != [c for _, c in tuned]:
        raise ValueError("base and tuned rows differ in response tokens: they were not encoded the same way")
    return base_sum, tuned_sum, tokens


def nll_difference(base: Scores, tuned: Scores) -> float:
    """Token-weighted mean NLL of base minus that of tuned (positive: fine-tuning lowered the NLL)."""
    base_sum, tuned_sum, tokens = _check_paired(base, tuned)
    return float((base_sum.sum() - tuned_sum.sum()) / tokens.sum())


def bootstrap_difference_ci(
    base: Scores, tuned: Scores, resamples: int, seed: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of nll_difference over resamples of the test rows drawn with replacement; each
    resample keeps the pairing (a row's base and tuned scores move together) and its own token weights."""
    base_sum, tuned_sum, tokens = _check_paired(base, tuned)
    gap = base_sum - tuned_sum
    return _percentiles(
        [(c @ gap) / np.maximum(c @ tokens, 1.0) for c in _resample_counts(len(tokens), resamples, seed)], confidence
    )


def _resample_counts(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of bootstrap resamples of n rows: how often each row is drawn in each resample."""
    rng = np.random.default_rng(seed)
    block = max(1, 4_000_000 // n)  # resamples per block: bounded memory on large test sets
    for start in range(0, resamples, block):
        yield rng.multinomial(n, np.full(n, 1 / n), size=min(block, resamples - start))


def _percentiles(blocks: list[np.ndarray], confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    low, high = np.quantile(np.concatenate(blocks), [alpha, 1 - alpha])
    return float(low), float(high)


def perplexity_delta_ci(
    base: Scores, tuned: Scores, resamples: int, seed: int, confidence: float
) -> tuple[float, float, float]:
    """Tuned minus base perplexity (of the token-weighted mean NLL) and its paired-bootstrap interval."""
    base_sum, tuned_sum, tokens = _check_paired(base, tuned)
    delta = float(np.exp(tuned_sum.sum() / tokens.sum()) - np.exp(base_sum.sum() / tokens.sum()))
    blocks = []
    for c in _resample_counts(len(tokens), resamples, seed):
        weight = np.maximum(c @ tokens, 1.0)
        blocks.append(np.exp((c @ tuned_sum) / weight) - np.exp((c @ base_sum) / weight))
    return (delta, *_percentiles(blocks, confidence))


def mean_delta_ci(
    base: Sequence[float], tuned: Sequence[float], resamples: int, seed: int, confidence: float
) -> tuple[float, float, float]:
    """Mean of the per-row tuned minus base values (e.g. chrF of each answer) and its paired-bootstrap interval."""
    if len(base) != len(tuned) or not base:
        raise ValueError(f"paired comparison needs the same non-empty rows (got {len(base)} and {len(tuned)})")
    gap = np.asarray(tuned, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    return (
        float(gap.mean()),
        *_percentiles([(c @ gap) / len(gap) for c in _resample_counts(len(gap), resamples, seed)], confidence),
    )


def mean_ci(values: Sequence[float], resamples: int, seed: int, confidence: float) -> tuple[float, float, float]:
    """The mean of per-row values (a reviewer's preference: 1, 0.5 or 0) and its bootstrap percentile interval."""
    if not values:
        raise ValueError("a mean needs at least one row")
    array = np.asarray(values, dtype=np.float64)
    return (
        float(array.mean()),
        *_percentiles([(c @ array) / len(array) for c in _resample_counts(len(array), resamples, seed)], confidence),
    )


def ratio_of_means_ci(
    numerator: Sequence[float], denominator: Sequence[float], resamples: int, seed: int, confidence: float
) -> tuple[float, float, float]:
    """mean(numerator) / mean(denominator) over paired rows (e.g. the words of each tuned answer over those of the
    base answer to the same prompt) and its paired-bootstrap interval: each resample draws rows with replacement
    and recomputes both means on them. A ratio of means, not a mean of ratios: an empty answer on one side makes
    no row's ratio infinite. Resamples whose denominator sums to 0 have no ratio and are left out."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(
            f"paired comparison needs the same non-empty rows (got {len(numerator)} and {len(denominator)})"
        )
    top, bottom = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if bottom.sum() <= 0:
        raise ValueError("the ratio of means is undefined: the denominator's values sum to 0")
    blocks = []
    for c in _resample_counts(len(top), resamples, seed):
        over, under = c @ top, c @ bottom
        blocks.append(over[under > 0] / under[under > 0])
    return (float(top.sum() / bottom.sum()), *_percentiles(blocks, confidence))


def win_rate(base: Scores, tuned: Scores) -> float:
    """Share of rows whose mean response NLL is lower under the tuned model (ties count half)."""
    base_sum, tuned_sum, tokens = _check_paired(base, tuned)
    base_mean, tuned_mean = base_sum / np.maximum(tokens, 1), tuned_sum / np.maximum(tokens, 1)
    wins = (tuned_mean < base_mean).sum() + 0.5 * (tuned_mean == base_mean).sum()
    return float(wins / len(tokens))


def compare(base: Scores, tuned: Scores, resamples: int, seed: int, confidence: float) -> dict[str, float]:
    low, high = bootstrap_difference_ci(base, tuned, resamples, seed, confidence)
    tokens = sum(c for _, c in base)
    return {
        "rows": len(base),
        "base_nll": sum(s for s, _ in base) / tokens,
        "tuned_nll": sum(s for s, _ in tuned) / tokens,
        "nll_improvement": nll_difference(base, tuned),
        "nll_improvement_ci_low": low,
        "nll_improvement_ci_high": high,
        "win_rate": win_rate(base, tuned),
    }


def compare_by_group(
    groups: Sequence[str], base: Scores, tuned: Scores, resamples: int, seed: int, confidence: float
) -> dict[str, dict[str, Any]]:
    """compare() within each group (e.g. the `source` of each row), in first-seen order."""
    out: dict[str, dict[str, Any]] = {}
    for group in dict.fromkeys(groups):
        idx = [i for i, g in enumerate(groups) if g == group]
        out[group] = compare([base[i] for i in idx], [tuned[i] for i in idx], resamples, seed, confidence)
    return out
