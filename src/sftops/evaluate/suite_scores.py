"""A regression suite reviewed: base against tuned on the suite's rows (response NLL with the paired bootstrap CI
and win rate; on a seeded sample of prompts the generations with the text metrics, lengths, degenerate answers and
stop rate, held to the suite's behaviour budget), and the verdict the promotion gate reads. Reading and preparing
suites is evaluate/suites.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftops.chat import generation_prompt
from sftops.config import Config, EvaluateConfig, SuiteConfig
from sftops.data.examples import training_examples
from sftops.errors import ConfigError, DataError
from sftops.evaluate import base_cache
from sftops.evaluate.behaviour import degenerate_reasons, within_tokens
from sftops.evaluate.comparison import compare, mean_delta_ci, perplexity_delta_ci
from sftops.evaluate.held_out import prompt_text
from sftops.evaluate.identity import base_eval_params
from sftops.evaluate.promotion import LENGTH_RATIO, SuiteResult, with_budget
from sftops.evaluate.sides import BaseSwitch, EvalSet, Side, base_side, behaviour_of, run_side
from sftops.evaluate.suites import SuiteRows, suite_budget, suite_margin, suite_metric
from sftops.evaluate.suites import generation_sample as suite_sample
from sftops.machine import package_dir
from sftops.provenance.fingerprints import tokenizer_sha256


@dataclass(frozen=True)
class SuiteRun:
    """One suite's review: its metrics (for metrics.json), its regression verdict (for the gate), the sampled
    generations side by side (for the report and its CSV) and its identity (an MLflow dataset input)."""

    name: str
    metrics: dict[str, Any]
    result: SuiteResult
    table: dict[str, list]
    dataset: dict[str, Any]
    base_cached: bool

    def most_worse(self, n: int = 5) -> list[dict[str, Any]]:
        """The sampled rows whose response NLL rose most under the tuned model, both answers side by side."""
        t = self.table
        order = sorted(range(len(t["prompt"])), key=lambda i: t["tuned_nll"][i] - t["base_nll"][i], reverse=True)
        cols = ("prompt", "reference", "base_output", "tuned_output", "base_nll", "tuned_nll")
        return [{c: t[c][i] for c in cols} for i in order[:n]]


def evaluate_suite(
    cfg: Config, suite: SuiteConfig, prepared: SuiteRows, tuned, base: BaseSwitch, tokenizer, dev
) -> SuiteRun:
    data, dropped = suite_set(cfg, suite, prepared, tokenizer)
    key = base_cache.cache_key(
        base.manifest["base"],
        prepared.sha256,
        tokenizer_sha256(tokenizer),
        {**base_eval_params(cfg), "num_generations": suite_generations(cfg, suite), "suite": True},
        dev.type,
    )
    base_run = base_side(base, tokenizer, data, cfg, dev, key)
    tuned_run = run_side(tuned, tokenizer, data, cfg, dev, "tuned")
    e = cfg.evaluate
    overall = compare(base_run.scores, tuned_run.scores, e.bootstrap_resamples, e.bootstrap_seed, e.confidence)
    result = verdict(cfg, suite, base_run, tuned_run, overall)
    metrics = {
        **{k: prepared.counts[k] for k in ("read", "rejected", "duplicates", "train_duplicates", "sampled_out")},
        "dropped_tokens": dropped,
        "rows": len(data.examples),
        "target_tokens": sum(c for _, c in tuned_run.scores),
        "generations": len(data.sample),
        "contaminated_prompts": len(prepared.contaminated),
        "contamination_examples": prepared.contaminated[:20],
        "base": base_run.summary(),
        "tuned": tuned_run.summary(),
        **{k: overall[k] for k in ("nll_improvement", "nll_improvement_ci_low", "nll_improvement_ci_high", "win_rate")},
        "confidence": e.confidence,
        "primary_metric": result.metric,
        "delta": result.tuned - result.base,
        "delta_ci_low": result.delta_ci_low,
        "delta_ci_high": result.delta_ci_high,
        "regression_margin": result.margin,
        "informational": suite.informational,
        "regressed": result.regressed,
        "behaviour": suite_behaviour(cfg.evaluate, suite, data, base_run, tuned_run),
        "sha256": prepared.sha256,
    }
    dataset = {
        "name": suite.name,
        "digest": prepared.sha256,
        "source": _suite_source(suite),
        "ids": [r["id"] for r in data.rows],
        "origins": [r["origin"] for r in data.rows],
    }
    return SuiteRun(suite.name, metrics, result, side_by_side(data, base_run, tuned_run), dataset, base_run.cached)


def suite_generations(cfg: Config, suite: SuiteConfig) -> int:
    """How many of the suite's prompts are answered: its own num_generations, else evaluate's."""
    return cfg.evaluate.num_generations if suite.num_generations is None else suite.num_generations


def suite_set(cfg: Config, suite: SuiteConfig, prepared: SuiteRows, tokenizer) -> tuple[EvalSet, int]:
    """The suite's rows that fit model.max_length with a target, and its seeded sample of prompts; and how many
    rows were left out for length or for having no target."""
    examples, kept, counts = training_examples(cfg, tokenizer, f"suite:{suite.name}", prepared.rows)
    if not examples:
        raise DataError(
            f"evaluate.suites {suite.name!r}: no row fits model.max_length={cfg.model.max_length} "
            f"with a target ({counts})"
        )
    rows = [prepared.rows[i] for i in kept]
    sample, refs = suite_sample(rows, suite_generations(cfg, suite), cfg.evaluate.sample_seed)
    prompts = [generation_prompt(tokenizer, r["messages"]) for r in sample]
    reachable = [within_tokens(tokenizer, r[0], cfg.evaluate.max_new_tokens) for r in refs]
    dropped = counts["dropped_too_long"] + counts["dropped_no_target"]
    return EvalSet(f"suite {suite.name}", examples, rows, sample, refs, prompts, reachable), dropped


def verdict(cfg: Config, suite: SuiteConfig, base: Side, tuned: Side, overall: dict[str, float]) -> SuiteResult:
    """The suite's primary metric, base against tuned, with the CI of the change and the regression margin."""
    e = cfg.evaluate
    metric = suite_metric(suite, e.primary_metric)
    base_summary, tuned_summary = base.summary(), tuned.summary()
    if metric not in tuned_summary:
        raise ConfigError(
            f"evaluate.suites {suite.name!r}: primary metric {metric!r} needs generations (set its num_generations > 0)"
        )
    low, high = _delta_ci(metric, base, tuned, overall, e)
    margin = suite_margin(suite, e.regression_margin)
    return SuiteResult(
        suite.name, metric, base_summary[metric], tuned_summary[metric], low, high, margin, suite.informational
    )


def suite_behaviour(e: EvaluateConfig, suite: SuiteConfig, data: EvalSet, base: Side, tuned: Side) -> dict[str, Any]:
    """How the answers to the suite's sampled prompts changed, held to the suite's budget: its length against the
    base model's answers, which fine-tuning on other data should not shrink."""
    block = behaviour_of(e, data, base, tuned)
    return with_budget(block, LENGTH_RATIO, *suite_budget(suite, e), f"suite {suite.name!r}", suite.informational)


def _delta_ci(
    metric: str, base: Side, tuned: Side, overall: dict[str, float], e: EvaluateConfig
) -> tuple[float, float]:
    """The confidence interval of (tuned - base) on a suite's primary metric."""
    stats = (e.bootstrap_resamples, e.bootstrap_seed, e.confidence)
    if metric == "nll":
        return -overall["nll_improvement_ci_high"], -overall["nll_improvement_ci_low"]
    if metric == "perplexity":
        return perplexity_delta_ci(base.scores, tuned.scores, *stats)[1:]
    return mean_delta_ci(base.generated[metric], tuned.generated[metric], *stats)[1:]


def side_by_side(data: EvalSet, base: Side, tuned: Side) -> dict[str, list]:
    """The sampled prompts with both answers, their scores and both models' response NLL."""
    picked = [data.rows.index(r) for r in data.sample]
    base_nll, tuned_nll = base.row_nll(), tuned.row_nll()
    return {
        "id": [r["id"] for r in data.sample],
        "prompt": [prompt_text(r["messages"]) for r in data.sample],
        "reference": [r[0] for r in data.refs],
        "base_output": base.texts(),
        "tuned_output": tuned.texts(),
        **{f"base_{k}": v for k, v in base.generated.items()},
        **{f"tuned_{k}": v for k, v in tuned.generated.items()},
        "base_new_tokens": [c.new_tokens for c in base.completions],
        "tuned_new_tokens": [c.new_tokens for c in tuned.completions],
        "base_degenerate": [r or "" for r in degenerate_reasons(base.completions, data.reachable)],
        "tuned_degenerate": [r or "" for r in degenerate_reasons(tuned.completions, data.reachable)],
        "base_nll": [base_nll[i] for i in picked],
        "tuned_nll": [tuned_nll[i] for i in picked],
    }


def _suite_source(suite: SuiteConfig) -> str:
    if suite.hub is not None:
        return f"https://huggingface.co/datasets/{suite.hub}"
    return str(((package_dir(suite.package) if suite.package else Path(".")) / suite.path).resolve())
