"""The promotion gate: a new model version becomes the `champion` only if its primary test metric beats the
current champion's, measured on the same test set (dataset digest) with the settings that metric depends on
(its comparison key: NLL does not depend on how many answers were generated), by more than a margin,
the data self-checks passed, its data and code are versioned (committed to a git ref, outputs in DVC's cache),
so that the champion can always be restored, and no regression suite regressed against the base model; otherwise
it is the `challenger`. Pure: the registry calls live in tracking."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

LOWER_IS_BETTER = {"nll", "perplexity"}
CHAMPION, CHALLENGER = "champion", "challenger"
GENERATION_FAMILY, NLL_FAMILY = "generation", "nll"


def metric_family(metric: str) -> str:
    """Which settings a metric depends on: response NLL and perplexity score the reference answers only, so
    they do not depend on what or how much is generated."""
    return NLL_FAMILY if metric in LOWER_IS_BETTER else GENERATION_FAMILY


@dataclass(frozen=True)
class Champion:
    version: str
    value: float | None  # its primary metric, None when it has no result comparable with the challenger's
    comparison_key: str | None  # the test set + the settings the primary metric depends on, as measured


@dataclass(frozen=True)
class SuiteResult:
    """One regression suite, base against tuned on its primary metric: delta = tuned - base, with its
    confidence interval."""

    name: str
    metric: str
    base: float
    tuned: float
    delta_ci_low: float
    delta_ci_high: float
    margin: float
    informational: bool = False

    @property
    def regressed(self) -> bool:
        """The whole interval lies on the worse side of the margin (a clear loss, not noise)."""
        if self.metric in LOWER_IS_BETTER:
            return self.delta_ci_low > self.margin
        return self.delta_ci_high < -self.margin

    def describe(self) -> str:
        return (
            f"suite {self.name!r} {self.metric} {self.base:.4f} (base) -> {self.tuned:.4f} (tuned), "
            f"CI of the change [{self.delta_ci_low:+.4f}, {self.delta_ci_high:+.4f}], margin {self.margin}"
        )


@dataclass(frozen=True)
class Decision:
    alias: str
    reason: str
    metric: str
    value: float
    champion_version: str | None = None
    champion_value: float | None = None
    regressed_suites: tuple[str, ...] = ()  # the blocking suites that regressed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def suite_results(metrics: dict[str, Any]) -> list[SuiteResult]:
    """The regression suites' verdict inputs, from the evaluation's metrics (metrics.json's `suites`)."""
    return [
        SuiteResult(
            name,
            v["primary_metric"],
            v["base"][v["primary_metric"]],
            v["tuned"][v["primary_metric"]],
            v["delta_ci_low"],
            v["delta_ci_high"],
            v["regression_margin"],
            v["informational"],
        )
        for name, v in metrics.get("suites", {}).items()
    ]


def data_checks(stats: dict[str, Any] | None) -> tuple[bool, str]:
    """The curated data's self-checks, from stats.json: a `checks_passed` flag, or a `checks` mapping of
    name -> bool (or {"passed": bool}). Data without recorded checks passes (there is nothing to fail)."""
    if not stats:
        return True, "no data checks recorded"
    if "checks_passed" in stats:
        passed = bool(stats["checks_passed"])
        return passed, "data checks passed" if passed else "data checks failed (stats.json: checks_passed=false)"
    checks = stats.get("checks")
    if isinstance(checks, dict) and checks:
        failed = [name for name, v in checks.items() if not (v.get("passed") if isinstance(v, dict) else v)]
        return (not failed), ("data checks passed" if not failed else f"data checks failed: {', '.join(failed)}")
    return True, "no data checks recorded"


def decide(
    metric: str,
    value: float,
    comparison_key: str,
    version: str,
    champion: Champion | None,
    margin: float,
    checks: tuple[bool, str] = (True, "no data checks recorded"),
    versioned: tuple[bool, str] = (True, "versioned"),
    suites: Sequence[SuiteResult] = (),
    base_value: float | None = None,
) -> Decision:
    is_versioned, version_note = versioned
    if not is_versioned:
        return Decision(
            CHALLENGER, f"its data is not versioned ({version_note}): not promoted", metric, value, *_champ(champion)
        )
    passed, check_note = checks
    if not passed:
        return Decision(CHALLENGER, f"{check_note}: not promoted", metric, value, *_champ(champion))
    regressed = [s for s in suites if s.regressed and not s.informational]
    if regressed:
        figures = "; ".join(s.describe() for s in regressed)
        return Decision(
            CHALLENGER,
            f"regressed against the base model on {figures}: not promoted",
            metric,
            value,
            *_champ(champion),
            regressed_suites=tuple(s.name for s in regressed),
        )
    blocking = [s for s in suites if not s.informational]
    if blocking:
        check_note += f"; no regression on {len(blocking)} suite{'s' if len(blocking) > 1 else ''}"
    noted = [s.name for s in suites if s.informational and s.regressed]
    if noted:
        check_note += (
            f"; informational suite{'s' if len(noted) > 1 else ''} {', '.join(noted)} regressed (not blocking)"
        )
    if base_value is not None and not _better(metric, value, base_value):
        return Decision(
            CHALLENGER,
            f"test {metric} {value:.4f} does not beat the base model's {base_value:.4f}: "
            "fine-tuning did not help on the test split, not promoted",
            metric,
            value,
            *_champ(champion),
        )
    if champion is None:
        return Decision(CHAMPION, f"no champion yet; {check_note}", metric, value)
    if champion.version == version:
        return Decision(CHAMPION, "already the champion (re-evaluated)", metric, value, *_champ(champion))
    if champion.value is None or champion.comparison_key != comparison_key:
        return Decision(
            CHALLENGER,
            f"champion v{champion.version} has no {metric} result on this test set with the settings {metric} "
            "depends on (tokenizer, max_length, overflow; for generation metrics also decoding and generations): "
            "no like-for-like comparison, so not promoted (evaluate the champion on this test set, or move the "
            "alias by hand)",
            metric,
            value,
            *_champ(champion),
        )
    gain = champion.value - value if metric in LOWER_IS_BETTER else value - champion.value
    compared = (
        f"test {metric} {value:.4f} vs champion v{champion.version}'s {champion.value:.4f} "
        f"(gain {gain:+.4f}, margin {margin})"
    )
    if gain > margin:
        return Decision(
            CHAMPION, f"{compared}: beats it by more than the margin; {check_note}", metric, value, *_champ(champion)
        )
    return Decision(
        CHALLENGER, f"{compared}: does not beat it by more than the margin", metric, value, *_champ(champion)
    )


def _better(metric: str, value: float, than: float) -> bool:
    return value < than if metric in LOWER_IS_BETTER else value > than


def _champ(champion: Champion | None) -> tuple[str | None, float | None]:
    return (champion.version, champion.value) if champion else (None, None)
