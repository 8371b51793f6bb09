"""Forgetting tracked during training: at every validation, each regression suite (evaluate.suites) on a fixed
seeded sample (the response NLL of train.suite_rows rows, the answers to train.suite_generations prompts) against
the same sample before the first step, held to the suite's budget by the code the promotion gate holds the final
model to (evaluate/suite_scores.py: the regression margin of its primary metric, its behaviour budget). The loop
exports the best validation within every blocking suite's budget; selection_of says which step that was and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sftops.config import Config, SuiteConfig
from sftops.data.store import load_split
from sftops.errors import ConfigError
from sftops.evaluate.comparison import compare
from sftops.evaluate.drift import answered, base_answers, prompts_of
from sftops.evaluate.promotion import budget_checks
from sftops.evaluate.sides import EvalSet, Side, run_side
from sftops.evaluate.suite_scores import suite_behaviour, suite_generations, suite_set, verdict
from sftops.evaluate.suites import prepare_suite, suite_metric


@dataclass(frozen=True)
class Probe:
    """One suite's fixed sample, and the model's results on it before the first step."""

    suite: SuiteConfig
    data: EvalSet
    before: Side


class Forgetting:
    """The suites' probes of one training run; measure(model) scores them all at a validation."""

    def __init__(self, cfg: Config, probes: list[Probe], tokenizer, device: torch.device) -> None:
        self.cfg, self.probes, self.tokenizer, self.device = cfg, probes, tokenizer, device

    def __bool__(self) -> bool:
        return bool(self.probes)

    def measure(self, model: torch.nn.Module) -> dict[str, Any]:
        """Per suite: its sample's response NLL and the change since step 0, the length ratio and degenerate share
        of its answers; and `broken`, the blocking suites' budgets this step breaks ("" when none)."""
        figures: dict[str, Any] = {}
        broken: list[str] = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for probe in self.probes:
                now = run_side(model, self.tokenizer, probe.data, self.cfg, self.device, "tuned")
                suite_figures, suite_broken = self._held_to_budget(probe, now)
                figures.update(suite_figures)
                broken += suite_broken
        return {**figures, "broken": "; ".join(broken)}

    def baseline(self) -> dict[str, Any]:
        """The figures measure() gives, before the first step (changes 0, ratios 1)."""
        figures: dict[str, Any] = {}
        for probe in self.probes:
            figures.update(self._held_to_budget(probe, probe.before)[0])
        return figures

    def _held_to_budget(self, probe: Probe, now: Side) -> tuple[dict[str, Any], list[str]]:
        e, suite, name = self.cfg.evaluate, probe.suite, probe.suite.name
        overall = compare(probe.before.scores, now.scores, e.bootstrap_resamples, e.bootstrap_seed, e.confidence)
        result = verdict(self.cfg, suite, probe.before, now, overall)
        block = suite_behaviour(e, suite, probe.data, probe.before, now)
        figures = {f"suite/{name}/{k}": v for k, v in now.summary().items() if k in ("nll", *GENERATED)}
        figures[f"suite/{name}/nll_change"] = figures[f"suite/{name}/nll"] - probe.before.summary()["nll"]
        figures[f"suite/{name}/{result.metric}_change"] = result.tuned - result.base
        for key in ("length_ratio", "degenerate_rate_tuned", "collapsed_rate_tuned", "stop_rate_tuned"):
            if key in block:
                figures[f"suite/{name}/{key.removesuffix('_tuned')}"] = block[key]
        if suite.informational:
            return figures, []
        broken = [c.describe() for c in budget_checks(block, f"suite {name!r}") if c.broken]
        if result.regressed:
            broken.insert(0, result.describe())
        return figures, broken


GENERATED = ("chrf", "rouge_l", "exact_match")


def start_forgetting(cfg: Config, model: torch.nn.Module, tokenizer, device: torch.device) -> Forgetting:
    """The suites' fixed samples, scored and answered by the model before its first step (the base model's
    results; a drift suite's references are its answers). Empty without suites, validations or train.suite_rows."""
    t = cfg.train
    if not (cfg.evaluate.suites and t.eval_every and t.suite_rows):
        return Forgetting(cfg, [], tokenizer, device)
    train_rows = load_split(cfg, "train")
    probes = [_probe(cfg, suite, train_rows, model, tokenizer, device) for suite in cfg.evaluate.suites]
    return Forgetting(cfg, probes, tokenizer, device)


def _probe(cfg: Config, suite: SuiteConfig, train_rows, model, tokenizer, device) -> Probe:
    t, e = cfg.train, cfg.evaluate
    generations = suite_generations(cfg, suite)
    sampled = suite.model_copy(
        update={
            "max_rows": min(t.suite_rows, suite.max_rows or t.suite_rows),
            "num_generations": min(t.suite_generations, generations),
        }
    )
    metric = suite_metric(suite, e.primary_metric)
    if not sampled.num_generations and metric not in ("nll", "perplexity"):
        raise ConfigError(
            f"evaluate.suites {suite.name!r}: its primary metric {metric!r} needs answers at every validation; set "
            "train.suite_generations > 0 (or train.suite_rows: 0 to score no suite during training)"
        )
    prepared = prepare_suite(sampled, train_rows, cfg.data, e.sample_seed)
    if suite.reference == "base":
        prompts = prompts_of(tokenizer, prepared)
        prepared = answered(prepared, base_answers(model, tokenizer, prompts, e.max_new_tokens, e.batch_size))
    data, _ = suite_set(cfg, sampled, prepared, tokenizer)
    return Probe(sampled, data, run_side(model, tokenizer, data, cfg, device, "base"))


def selection_of(validations: list[dict[str, Any]], chosen_step: int, last_step: int) -> dict[str, Any]:
    """Which step's weights were exported, and why, in one line: the lowest validation NLL among the validations
    within every blocking suite's budget; when none was, the last step's, refused promotion."""
    if not validations:
        return {
            "step": last_step,
            "within_budget": None,
            "reason": f"step {last_step}, the last: no validation during training (train.eval_every is null)",
        }
    outside = [v for v in validations if v.get("broken")]
    if len(outside) == len(validations):
        first = outside[0]
        return {
            "step": last_step,
            "within_budget": False,
            "reason": (
                f"no validated checkpoint stayed within every blocking suite's budget (steps "
                f"{', '.join(str(v['step']) for v in outside)}; at step {first['step']}: {first['broken']}): "
                f"step {last_step}, the last, is exported and is not promoted"
            ),
        }
    chosen = next(v for v in validations if v["step"] == chosen_step)
    note = (
        f"; later steps broke a budget ({', '.join(str(v['step']) for v in outside if v['step'] > chosen_step)})"
        if any(v["step"] > chosen_step for v in outside)
        else ""
    )
    return {
        "step": chosen_step,
        "within_budget": True,
        "reason": (
            f"step {chosen_step} of {last_step}: the lowest validation NLL ({chosen['val_nll']:.4f}) among the "
            f"{len(validations) - len(outside)} of {len(validations)} validations within every blocking suite's "
            f"budget{note}"
        ),
    }
