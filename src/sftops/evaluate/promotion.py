"""The promotion gate: a new model version becomes the `champion` only if its primary test metric beats the
current champion's, measured on the same test set (dataset digest) with the settings that metric depends on
(its comparison key: NLL does not depend on how many answers were generated), by more than a margin,
the data self-checks passed, its data and code are versioned (committed to a git ref, outputs in DVC's cache),
so that the champion can always be restored, no regression suite regressed against the base model, and no
behaviour budget was broken (answers of the test split or a suite that shrank or degenerated beyond its limit),
and no reviewer rejected it (with tracking.require_review: a reviewer approved it); otherwise it is the
`challenger`. Pure: the registry calls live in tracking."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from sftops.tracking.review_state import APPROVED, PENDING, REJECTED

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


LENGTH_RATIO, LENGTH_RATIO_TO_REFERENCE = "length_ratio", "length_ratio_to_reference"  # floors
DEGENERATE_RISE, COLLAPSED_RISE = "degenerate_rise", "collapsed_rise"  # ceilings
RISES = {DEGENERATE_RISE: "degenerate", COLLAPSED_RISE: "collapsed (empty or looping)"}


@dataclass(frozen=True)
class BudgetCheck:
    """One behaviour budget of one evaluation set, base against tuned on the same prompts (evaluate/behaviour.py):
    a floor on a length ratio (mean words tuned / base, or tuned / reference) or a ceiling on the rise of the share
    of degenerate answers (or of collapsed ones: empty or looping), with the figure's confidence interval."""

    where: str  # "test split", "suite 'general'"
    metric: str  # LENGTH_RATIO, LENGTH_RATIO_TO_REFERENCE, DEGENERATE_RISE or COLLAPSED_RISE
    before: float  # mean words of the base answers (of the references), or the base's degenerate share
    after: float  # mean words of the tuned answers, or the tuned degenerate share
    value: float  # the ratio, or the rise (after - before)
    ci_low: float
    ci_high: float
    limit: float  # the floor of a ratio, the ceiling of a rise
    informational: bool = False

    @property
    def broken(self) -> bool:
        """The whole interval lies beyond the limit (a clear breach, not noise), as a suite regresses."""
        if self.metric in RISES:
            return self.ci_low > self.limit
        return self.ci_high < self.limit

    @property
    def label(self) -> str:
        return f"{self.where} {self.metric}"

    def describe(self) -> str:
        if self.metric in RISES:
            return (
                f"{self.label} {self.value:+.4f} (share of {RISES[self.metric]} answers {self.before:.4f} (base) -> "
                f"{self.after:.4f} (tuned)), CI [{self.ci_low:+.4f}, {self.ci_high:+.4f}], ceiling {self.limit}"
            )
        against = "reference" if self.metric == LENGTH_RATIO_TO_REFERENCE else "base"
        return (
            f"{self.label} {self.value:.4f} (mean words {self.before:.2f} ({against}) -> {self.after:.2f} (tuned)), "
            f"CI [{self.ci_low:.4f}, {self.ci_high:.4f}], floor {self.limit}"
        )


def budget_checks(block: dict[str, Any], where: str, informational: bool = False) -> list[BudgetCheck]:
    """The budgets a behaviour block (metrics.json's `behaviour`) is held to, as it records them: its gated length ratio
    against min_length_ratio, its degenerate and collapsed rises against max_degenerate_rise; a limit of null, or a
    figure that could not be measured (no generations, base answers without words), is not checked."""
    checks = []
    ratio, floor = block.get("gated_length_ratio"), block.get("min_length_ratio")
    if floor is not None and ratio in block:
        before = "words_mean_reference" if ratio == LENGTH_RATIO_TO_REFERENCE else "words_mean_base"
        checks.append(_check(block, where, ratio, (before, "words_mean_tuned"), floor, informational))
    ceiling = block.get("max_degenerate_rise")
    for rise, share in ((DEGENERATE_RISE, "degenerate_rate"), (COLLAPSED_RISE, "collapsed_rate")):
        if ceiling is not None and rise in block:
            checks.append(_check(block, where, rise, (f"{share}_base", f"{share}_tuned"), ceiling, informational))
    return checks


def _check(
    block: dict[str, Any], where: str, metric: str, sides: tuple[str, str], limit: float, informational: bool
) -> BudgetCheck:
    before, after = (block[key] for key in sides)
    low, high = block[f"{metric}_ci_low"], block[f"{metric}_ci_high"]
    return BudgetCheck(where, metric, before, after, block[metric], low, high, limit, informational)


def with_budget(
    block: dict[str, Any],
    gated_length_ratio: str,
    min_length_ratio: float | None,
    max_degenerate_rise: float | None,
    where: str,
    informational: bool = False,
) -> dict[str, Any]:
    """A behaviour block with the budget it is held to and the budgets it broke (for metrics.json and the report;
    the gate checks again from the figures)."""
    if not block:
        return block
    budgeted = {
        **block,
        "gated_length_ratio": gated_length_ratio,
        "min_length_ratio": min_length_ratio,
        "max_degenerate_rise": max_degenerate_rise,
    }
    budgeted["broken"] = [c.metric for c in budget_checks(budgeted, where, informational) if c.broken]
    return budgeted


def behaviour_checks(metrics: dict[str, Any]) -> list[BudgetCheck]:
    """Every behaviour budget of an evaluation, from its metrics (metrics.json): the test split's, then each
    suite's (an informational suite's never blocks)."""
    checks = budget_checks(metrics.get("behaviour", {}), "test split")
    for name, values in metrics.get("suites", {}).items():
        checks += budget_checks(values.get("behaviour", {}), f"suite {name!r}", values["informational"])
    return checks


@dataclass(frozen=True)
class Decision:
    alias: str
    reason: str
    metric: str
    value: float
    champion_version: str | None = None
    champion_value: float | None = None
    regressed_suites: tuple[str, ...] = ()  # the blocking suites that regressed
    broken_budgets: tuple[str, ...] = ()  # the blocking behaviour budgets broken: "suite 'general' length_ratio"
    passed_gate: bool = False  # the automatic gate (metrics, checks, versioning) alone would make it champion
    review: str = PENDING  # the human verdict it was decided with: approved, rejected or pending

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


def _automatic(
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
    budgets: Sequence[BudgetCheck] = (),
    selection: dict[str, Any] | None = None,
    served: tuple[bool, str] = (True, "serving parity not checked"),
) -> Decision:
    """The automatic gate, from the figures alone."""
    is_versioned, version_note = versioned
    if not is_versioned:
        return Decision(
            CHALLENGER, f"its data is not versioned ({version_note}): not promoted", metric, value, *_champ(champion)
        )
    passed, check_note = checks
    if not passed:
        return Decision(CHALLENGER, f"{check_note}: not promoted", metric, value, *_champ(champion))
    if selection and selection.get("within_budget") is False:
        return Decision(CHALLENGER, f"during training, {selection['reason']}", metric, value, *_champ(champion))
    if not served[0]:  # what a deployer would serve is not what was evaluated (evaluate/parity.py)
        return Decision(CHALLENGER, f"{served[1]}: not promoted", metric, value, *_champ(champion))
    regressed = [s for s in suites if s.regressed and not s.informational]
    broken = [b for b in budgets if b.broken and not b.informational]
    if regressed or broken:
        refusals = []
        if regressed:
            refusals.append(f"regressed against the base model on {'; '.join(s.describe() for s in regressed)}")
        if broken:
            refusals.append(f"broke its behaviour budget on {'; '.join(b.describe() for b in broken)}")
        return Decision(
            CHALLENGER,
            f"{'; '.join(refusals)}: not promoted",
            metric,
            value,
            *_champ(champion),
            regressed_suites=tuple(s.name for s in regressed),
            broken_budgets=tuple(b.label for b in broken),
        )
    blocking = [s for s in suites if not s.informational]
    if blocking:
        check_note += f"; no regression on {len(blocking)} suite{'s' if len(blocking) > 1 else ''}"
    noted = [s.name for s in suites if s.informational and s.regressed]
    if noted:
        check_note += (
            f"; informational suite{'s' if len(noted) > 1 else ''} {', '.join(noted)} regressed (not blocking)"
        )
    if any(not b.informational for b in budgets):
        check_note += "; answers within their behaviour budgets"
    noted_budgets = [b.label for b in budgets if b.informational and b.broken]
    if noted_budgets:
        check_note += f"; informational behaviour budget broken on {', '.join(noted_budgets)} (not blocking)"
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
    budgets: Sequence[BudgetCheck] = (),
    selection: dict[str, Any] | None = None,
    served: tuple[bool, str] = (True, "serving parity not checked"),
    review: tuple[str, str] = (PENDING, ""),
    require_review: bool = False,
) -> Decision:
    """selection: how training chose the exported step (run.json's `selection`); a run where no validated step
    was within every blocking suite's budget is refused. review: the version's review state (approved, rejected,
    pending) and who set it, why ("by alice: ..."): a rejected version never becomes champion; with
    `require_review` only an approved one does."""
    decision = _automatic(
        metric,
        value,
        comparison_key,
        version,
        champion,
        margin,
        checks,
        versioned,
        suites,
        base_value,
        budgets,
        selection,
        served,
    )
    return with_review(decision, *review, require_review)


def with_review(decision: Decision, state: str, who: str, require_review: bool) -> Decision:
    """The automatic gate's decision and the human verdict together: a version the gate refuses stays refused
    whatever the review says; one it passes becomes champion unless rejected, or (require_review) not approved."""
    passed = decision.alias == CHAMPION
    decision = replace(decision, passed_gate=passed, review=state)
    said = f" {who}" if who else ""
    if not passed:
        rejected = f"; also rejected in review{said}" if state == REJECTED else ""
        return replace(decision, reason=decision.reason + rejected)
    if state == REJECTED:
        return replace(
            decision,
            alias=CHALLENGER,
            reason=f"passed the gate ({decision.reason}); rejected in review{said}: not promoted",
        )
    if state == APPROVED:
        return replace(decision, reason=f"{decision.reason}; approved in review{said}")
    if require_review:
        return replace(
            decision,
            alias=CHALLENGER,
            reason=f"passed the gate ({decision.reason}); awaiting review (tracking.require_review): not promoted "
            "until approved",
        )
    return decision


def _better(metric: str, value: float, than: float) -> bool:
    return value < than if metric in LOWER_IS_BETTER else value > than


def _champ(champion: Champion | None) -> tuple[str | None, float | None]:
    return (champion.version, champion.value) if champion else (None, None)
