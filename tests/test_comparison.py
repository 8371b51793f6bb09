"""The paired comparison of base and tuned response NLL: hand-computed values, and the bootstrap interval
against an independent, plain-Python resampling."""

import random

import pytest

from sftops.evaluate.comparison import bootstrap_difference_ci, compare_by_group, nll_difference, win_rate

# (summed NLL, response tokens) per row
BASE = [(10.0, 5), (6.0, 2), (9.0, 3), (4.0, 4)]
TUNED = [(5.0, 5), (7.0, 2), (3.0, 3), (4.0, 4)]


def test_nll_difference_is_the_token_weighted_mean_gap():
    # base: 29 / 14 tokens, tuned: 19 / 14 tokens -> 10 / 14
    assert nll_difference(BASE, TUNED) == pytest.approx(10 / 14)


def test_win_rate_counts_rows_with_lower_mean_nll_and_ties_as_half():
    # row means base 2, 3, 3, 1; tuned 1, 3.5, 1, 1 -> wins, loss, win, tie
    assert win_rate(BASE, TUNED) == pytest.approx((1 + 0 + 1 + 0.5) / 4)


def test_bootstrap_interval_matches_a_plain_python_resampling():
    rng = random.Random(1)
    base = [(rng.uniform(2, 8) * n, n) for n in (rng.randint(3, 40) for _ in range(60))]
    tuned = [(s * rng.uniform(0.5, 1.1), n) for s, n in base]
    low, high = bootstrap_difference_ci(base, tuned, resamples=4000, seed=0, confidence=0.9)

    # Independent: draw row indices with replacement, recompute the weighted difference, take percentiles.
    draws = []
    for _ in range(4000):
        idx = [rng.randrange(len(base)) for _ in base]
        tokens = sum(base[i][1] for i in idx)
        draws.append(sum(base[i][0] - tuned[i][0] for i in idx) / tokens)
    draws.sort()
    ref_low, ref_high = draws[int(0.05 * 4000)], draws[int(0.95 * 4000) - 1]
    spread = ref_high - ref_low
    assert low == pytest.approx(ref_low, abs=0.05 * spread) and high == pytest.approx(ref_high, abs=0.05 * spread)
    assert low < nll_difference(base, tuned) < high


def test_bootstrap_is_seeded_and_collapses_when_every_row_gains_the_same():
    assert bootstrap_difference_ci(BASE, TUNED, 200, seed=3) == bootstrap_difference_ci(BASE, TUNED, 200, seed=3)
    same_gain = [(s - n * 0.25, n) for s, n in BASE]  # every row 0.25 nats/token better
    low, high = bootstrap_difference_ci(BASE, same_gain, 200, seed=0)
    assert low == pytest.approx(0.25) and high == pytest.approx(0.25)


def test_groups_are_compared_separately():
    groups = ["a", "b", "a", "b"]
    out = compare_by_group(groups, BASE, TUNED, 100, 0, 0.95)
    assert list(out) == ["a", "b"]
    assert out["a"]["rows"] == 2 and out["a"]["nll_improvement"] == pytest.approx((19 - 8) / 8)
    assert out["b"]["nll_improvement"] == pytest.approx((10 - 11) / 6)
    assert out["b"]["win_rate"] == pytest.approx(0.25)


def test_unpaired_rows_are_refused():
    with pytest.raises(ValueError):
        nll_difference(BASE, TUNED[:3])
    with pytest.raises(ValueError):
        nll_difference(BASE, [(s, n + 1) for s, n in TUNED])
