"""Stage 4, evaluate: the base and the fine-tuned model side by side on the held-out test split — response
NLL and perplexity on every test row with a paired bootstrap CI of the difference and the win rate (overall
and per source), generations scored against the references — and the same on each regression suite
(evaluate.suites, see sftops.evaluate.suites); then the HTML report, MLflow, and the promotion gate. The base model's
results are cached (sftops.evaluate.base_cache)."""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sftops import faults, tracking
from sftops.chat import IGNORE, Encoded, generation_prompt
from sftops.config import Config, EvaluateConfig, ModelConfig, SuiteConfig
from sftops.data.examples import training_examples
from sftops.data.store import TokenRows, load_split
from sftops.errors import ConfigError, DataError, GpuMemoryError
from sftops.evaluate import base_cache, report
from sftops.evaluate.comparison import compare, compare_by_group, mean_delta_ci, perplexity_delta_ci
from sftops.evaluate.generation import Completion, Decoding, complete
from sftops.evaluate.promotion import (
    GENERATION_FAMILY,
    NLL_FAMILY,
    SuiteResult,
    data_checks,
    decide,
    metric_family,
    suite_results,
)
from sftops.evaluate.scoring import generation_sample, row_scores, summarise
from sftops.evaluate.suites import (
    SuiteRows,
    prepare_suite,
    suite_margin,
    suite_metric,
)
from sftops.evaluate.suites import (
    generation_sample as suite_sample,
)
from sftops.evaluate.textmetrics import length_stats
from sftops.jsonio import read_json, require, write_json
from sftops.layout import (
    GENERATIONS_FILE,
    MODEL_DIR,
    REPORT_FILE,
    ROWS_FILE,
    RUN_FILE,
    STATS,
    SUITES_DIR,
    TRAIN_CURVE,
    VAL_CURVE,
)
from sftops.machine import device, package_dir, require_hardware
from sftops.modeling import is_adapter, load_base_model, load_finetuned, read_manifest
from sftops.outputs import replaced_whole
from sftops.provenance.fingerprints import file_sha256, json_sha256, tokenizer_sha256
from sftops.train.curves import read_curve
from sftops.train.loss import score_rows


def decoding(cfg: EvaluateConfig) -> Decoding:
    return Decoding(cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.sample_seed)


def base_eval_params(cfg: Config) -> dict[str, Any]:
    """The settings the base model's scores and outputs depend on (not the scoring rules or statistics)."""
    e = cfg.evaluate
    return {
        "max_length": cfg.model.max_length,
        "batch_size": e.batch_size,
        "num_generations": e.num_generations,
        **asdict(decoding(e)),
    }


TEST_DATASET = "test"


def comparable_settings(cfg: Config, tokenizer_sha: str) -> dict[str, dict[str, Any]]:
    """Per metric family, the settings its value depends on besides the test data: NLL on the tokenizer and
    chat template and how rows are fitted to max_length; generation metrics also on what is generated and how
    it is scored. The batch size is there for generations only: left padding can move a greedy token, while
    NLL is per-row (padding is masked)."""
    e = cfg.evaluate
    nll = {"tokenizer_sha256": tokenizer_sha, "max_length": cfg.model.max_length, "overflow": cfg.data.overflow}
    generation = {
        **nll,
        "num_generations": e.num_generations,
        "answer_extraction": e.answer_extraction,
        "batch_size": e.batch_size,
        **asdict(decoding(e)),
    }
    return {NLL_FAMILY: nll, GENERATION_FAMILY: generation}


def evaluation_identity(cfg: Config, test_file: Path, tokenizer) -> dict[str, Any]:
    """What a result was measured on: the test split as an MLflow dataset (name, digest: the file's sha256, 32
    characters as MLflow keeps them) and per metric family the settings and a key over both. Two results on a
    metric compare like for like when their family's keys match."""
    digest = file_sha256(test_file)[:32]
    settings = comparable_settings(cfg, tokenizer_sha256(tokenizer))
    keys = {family: json_sha256({"dataset": digest, **values}) for family, values in settings.items()}
    return {"dataset": {"name": TEST_DATASET, "digest": digest}, "settings": settings, "keys": keys}


def _score_and_generate(
    model, tokenizer, examples: list[Encoded], prompts: list[str], cfg: Config, dev, who: str, on: str = "test split"
):
    try:
        faults.out_of_memory(f"evaluate:{who}")
        scores = score_rows(
            model, examples, cfg.evaluate.batch_size, tokenizer.pad_token_id, dev, desc=f"score {who} on {on}"
        )
        completions = complete(
            model, tokenizer, prompts, decoding(cfg.evaluate), cfg.evaluate.batch_size, desc=f"generate {who} on {on}"
        )
    except torch.OutOfMemoryError:
        smaller = f"evaluate.batch_size={cfg.evaluate.batch_size // 2}, or " if cfg.evaluate.batch_size > 1 else ""
        raise GpuMemoryError(
            f"evaluating the {who} model ran out of GPU memory. Try {smaller}a smaller "
            f"evaluate.max_new_tokens (now {cfg.evaluate.max_new_tokens}) or model.max_length"
        ) from None
    return scores, completions


class BaseModel:
    """The base model, switched on only when a result is not in the cache: the tuned model with its adapter
    disabled (the same weights), or the base loaded once from the manifest for a full fine-tune."""

    def __init__(self, manifest: dict[str, Any], tuned, dev) -> None:
        self.manifest, self.tuned, self.dev, self._loaded = manifest, tuned, dev, None

    @contextlib.contextmanager
    def active(self):
        if is_adapter(self.manifest):
            with self.tuned.disable_adapter():
                yield self.tuned
            return
        if self._loaded is None:
            self._loaded = load_base_model(ModelConfig.model_validate(self.manifest["base"])).to(self.dev)
            self._loaded.eval()
        yield self._loaded


def _base_results(
    cfg, base: BaseModel, tokenizer, examples, prompts, dev, key: str, on: str = "test split"
) -> tuple[list, list[Completion], bool]:
    cached = base_cache.load(key)
    # The key covers the data and settings; checking the token counts as well costs nothing.
    expected = (
        examples.target_counts().tolist()
        if isinstance(examples, TokenRows)  # from the arrays, not per token
        else [sum(label != IGNORE for label in e.labels[1:]) for e in examples]
    )
    if cached is not None and [c for _, c in cached["scores"]] == expected:
        return [tuple(s) for s in cached["scores"]], [Completion(**c) for c in cached["completions"]], True
    with base.active() as model:
        scores, completions = _score_and_generate(model, tokenizer, examples, prompts, cfg, dev, "base", on)
    base_cache.store(key, {"scores": scores, "completions": [asdict(c) for c in completions]})
    return scores, completions, False


def _write_csv(path: Path, table: dict[str, list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(table)
        writer.writerows(zip(*table.values()))


def _prompt_text(messages: list[dict[str, str]]) -> str:
    return messages[-2]["content"] if len(messages) > 1 else ""


def _test_inputs(cfg: Config, tokenizer) -> tuple[list[Encoded], list[dict], list[dict], list[list[str]], list[str]]:
    """The test split as scored (examples and the rows they came from) and as generated from (the sampled rows,
    their references and prompts)."""
    rows = load_split(cfg, "test")
    examples, kept, counts = training_examples(cfg, tokenizer, "test", rows)
    if not examples:
        raise DataError(f"no test rows to evaluate on ({counts}); raise data.test_fraction or model.max_length")
    kept_rows = [rows[i] for i in kept]
    sample, refs = generation_sample(kept_rows, cfg.evaluate.num_generations)
    return examples, kept_rows, sample, refs, [generation_prompt(tokenizer, r["messages"]) for r in sample]


def measure_model(cfg: Config, model_dir: Path, curated: Path) -> tuple[dict[str, Any], dict[str, list]]:
    """One model alone on the test split in `curated`, scored as run_evaluate scores the tuned model (the
    champion's side of a comparison it has no result for): its metrics with their evaluation identity, and
    its generations table."""
    local = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"curated": str(curated)})})
    dev = device()
    model, tokenizer = load_finetuned(model_dir)
    model.to(dev)
    examples, _, sample, refs, prompts = _test_inputs(local, tokenizer)
    scores, completions = _score_and_generate(model, tokenizer, examples, prompts, local, dev, "champion")
    generated = row_scores([c.text for c in completions], refs, cfg.evaluate.answer_extraction)
    metrics = {
        "test_rows": len(examples),
        "test_target_tokens": sum(c for _, c in scores),
        "generations": len(sample),
        "tuned": summarise(scores, generated, completions),
        "evaluation": evaluation_identity(local, curated / "test.parquet", tokenizer),
    }
    table = {
        "id": [r["id"] for r in sample],
        "prompt": [_prompt_text(r["messages"]) for r in sample],
        "reference": [r[0] for r in refs],
        "tuned_output": [c.text for c in completions],
        **{f"tuned_{name}": values for name, values in generated.items()},
    }
    return metrics, table


def champion_measurer(cfg: Config) -> Callable[[Path, Path], tuple[dict[str, Any], dict[str, list]]]:
    """For the promotion gate (tracking.promote): measure a model folder on a curated folder's test split with
    these evaluation settings."""
    return lambda model_dir, curated: measure_model(cfg, model_dir, curated)


def run_evaluate(cfg: Config) -> dict[str, Any]:
    require_hardware("lora", cfg.model.attn_implementation)  # the method trained is done; attention still runs here
    # Suites first: a missing or empty suite stops the stage before any model is loaded.
    train_rows = load_split(cfg, "train") if cfg.evaluate.suites else []
    prepared = [prepare_suite(s, train_rows, cfg.data, cfg.evaluate.sample_seed) for s in cfg.evaluate.suites]
    model_dir = Path(cfg.paths.model) / MODEL_DIR
    run_info = read_json(require(Path(cfg.paths.model) / RUN_FILE, "train"))
    dev = device()
    tuned, tokenizer = load_finetuned(model_dir)
    tuned.to(dev)
    manifest = read_manifest(model_dir)

    test_file = require(Path(cfg.paths.curated) / "test.parquet", "format")
    examples, kept_rows, sample, refs, prompts = _test_inputs(cfg, tokenizer)

    base = BaseModel(manifest, tuned, dev)
    key = base_cache.cache_key(
        manifest["base"], file_sha256(test_file), tokenizer_sha256(tokenizer), base_eval_params(cfg), dev.type
    )
    base_scores, base_out, base_cached = _base_results(cfg, base, tokenizer, examples, prompts, dev, key)
    tuned_scores, tuned_out = _score_and_generate(tuned, tokenizer, examples, prompts, cfg, dev, "tuned")

    rule = cfg.evaluate.answer_extraction
    base_gen = row_scores([c.text for c in base_out], refs, rule)
    tuned_gen = row_scores([c.text for c in tuned_out], refs, rule)
    e = cfg.evaluate
    stats = (e.bootstrap_resamples, e.bootstrap_seed, e.confidence)
    overall = compare(base_scores, tuned_scores, *stats)
    sources = [r.get("source", "all") for r in kept_rows]
    metrics: dict[str, Any] = {
        "test_rows": len(examples),
        "test_target_tokens": sum(c for _, c in tuned_scores),
        "generations": len(sample),
        "base": summarise(base_scores, base_gen, base_out),
        "tuned": summarise(tuned_scores, tuned_gen, tuned_out),
        "nll_improvement": overall["nll_improvement"],
        "nll_improvement_ci_low": overall["nll_improvement_ci_low"],
        "nll_improvement_ci_high": overall["nll_improvement_ci_high"],
        "confidence": e.confidence,
        "win_rate": overall["win_rate"],
        **length_stats([r[0] for r in refs], "reference"),
        "per_source": compare_by_group(sources, base_scores, tuned_scores, *stats),
        # What the promotion gate needs besides the numbers: the evaluation's identity and the data's self-checks.
        "evaluation": evaluation_identity(cfg, test_file, tokenizer),
        "data_checks": _data_checks(cfg),
    }
    for source, values in metrics["per_source"].items():
        picked = [i for i, r in enumerate(sample) if r.get("source", "all") == source]
        for who, gen in (("base", base_gen), ("tuned", tuned_gen)):
            values.update(
                {f"{who}_{name}": sum(v[i] for i in picked) / len(picked) for name, v in gen.items() if picked}
            )

    # Per test row (all of them): the NLL of each model, for the report's best/worst rows and for review.
    row_of = {r["id"]: i for i, r in enumerate(kept_rows)}
    per_row = {
        "id": [r["id"] for r in kept_rows],
        "source": sources,
        "response_tokens": [c for _, c in tuned_scores],
        "base_nll": [s / max(c, 1) for s, c in base_scores],
        "tuned_nll": [s / max(c, 1) for s, c in tuned_scores],
    }
    sampled = [row_of[r["id"]] for r in sample]
    table = {
        "id": [r["id"] for r in sample],
        "source": [r.get("source", "all") for r in sample],
        "prompt": [_prompt_text(r["messages"]) for r in sample],
        "reference": [r[0] for r in refs],
        "other_references": [len(r) - 1 for r in refs],
        "base_output": [c.text for c in base_out],
        "tuned_output": [c.text for c in tuned_out],
        **{f"base_{name}": values for name, values in base_gen.items()},
        **{f"tuned_{name}": values for name, values in tuned_gen.items()},
        "base_new_tokens": [c.new_tokens for c in base_out],
        "tuned_new_tokens": [c.new_tokens for c in tuned_out],
        "base_nll": [per_row["base_nll"][i] for i in sampled],
        "tuned_nll": [per_row["tuned_nll"][i] for i in sampled],
    }
    suite_runs = [
        evaluate_suite(cfg, suite, rows, tuned, base, tokenizer, dev)
        for suite, rows in zip(cfg.evaluate.suites, prepared)
    ]
    if suite_runs:
        metrics["suites"] = {run.name: run.metrics for run in suite_runs}
    # The previous reports/ and metrics.json stay until the new ones are complete.
    with replaced_whole(cfg.paths.reports) as reports:
        _write_csv(reports / GENERATIONS_FILE, table)
        _write_csv(reports / ROWS_FILE, per_row)
        for run in suite_runs:
            _write_csv(reports / SUITES_DIR / f"{run.name}.csv", run.table)

        decision = _promotion_preview(cfg, run_info, metrics)
        curves = {
            "train loss": read_curve(Path(cfg.paths.model) / TRAIN_CURVE, "train_loss"),
            "validation NLL": read_curve(Path(cfg.paths.model) / VAL_CURVE, "val_nll"),
        }
        review_rows = [
            {
                "prompt": _prompt_text(r["messages"]),
                "reference": r["messages"][-1]["content"],
                "base_nll": per_row["base_nll"][i],
                "tuned_nll": per_row["tuned_nll"][i],
            }
            for i, r in enumerate(kept_rows)
        ]
        title = (
            f"{run_info.get('registered_model', 'model')} v{run_info.get('version', '?')} (run {run_info['run_id']})"
        )
        worst = {run.name: run.most_worse() for run in suite_runs}
        html = report.render(title, metrics, curves, review_rows, table, decision, worst)
        (reports / REPORT_FILE).write_text(html, encoding="utf-8")
        write_json(Path(cfg.paths.metrics), metrics)  # with the reports: a failure before here leaves both as they were
    # The files are in place before MLflow hears of them: the registry's alias moves last, so a failure in
    # between leaves files newer than the registry (a re-run logs again), never a champion without its report.
    reports = Path(cfg.paths.reports)
    files = [Path(cfg.paths.metrics), reports / REPORT_FILE, reports / ROWS_FILE]
    files += [reports / SUITES_DIR / f"{run.name}.csv" for run in suite_runs]
    faults.pause("evaluate_logging")
    tracking.log_evaluation(run_info, metrics, table, files, [run.dataset for run in suite_runs], test_file)
    return {
        **metrics,
        "base_eval_cached": base_cached,
        "suites_base_eval_cached": {run.name: run.base_cached for run in suite_runs},
        "report": str(Path(cfg.paths.reports) / REPORT_FILE),
    }


@dataclass
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


def _delta_ci(
    metric: str, base_scores, tuned_scores, base_gen, tuned_gen, overall, e: EvaluateConfig
) -> tuple[float, float]:
    """The confidence interval of (tuned - base) on a suite's primary metric."""
    stats = (e.bootstrap_resamples, e.bootstrap_seed, e.confidence)
    if metric == "nll":
        return -overall["nll_improvement_ci_high"], -overall["nll_improvement_ci_low"]
    if metric == "perplexity":
        return perplexity_delta_ci(base_scores, tuned_scores, *stats)[1:]
    return mean_delta_ci(base_gen[metric], tuned_gen[metric], *stats)[1:]


def evaluate_suite(
    cfg: Config, suite: SuiteConfig, prepared: SuiteRows, tuned, base: BaseModel, tokenizer, dev
) -> SuiteRun:
    """Base against tuned on the suite's rows: response NLL with the paired bootstrap CI and win rate, and on a
    seeded sample of prompts the generations with the text metrics, lengths and stop rate."""
    e, on = cfg.evaluate, f"suite {suite.name}"
    examples, kept, counts = training_examples(cfg, tokenizer, f"suite:{suite.name}", prepared.rows)
    if not examples:
        raise DataError(
            f"evaluate.suites {suite.name!r}: no row fits model.max_length={cfg.model.max_length} "
            f"with a target ({counts})"
        )
    rows = [prepared.rows[i] for i in kept]
    n = e.num_generations if suite.num_generations is None else suite.num_generations
    sample, refs = suite_sample(rows, n, e.sample_seed)
    prompts = [generation_prompt(tokenizer, r["messages"]) for r in sample]
    key = base_cache.cache_key(
        base.manifest["base"],
        prepared.sha256,
        tokenizer_sha256(tokenizer),
        {**base_eval_params(cfg), "num_generations": n, "suite": True},
        dev.type,
    )
    base_scores, base_out, cached = _base_results(cfg, base, tokenizer, examples, prompts, dev, key, on)
    tuned_scores, tuned_out = _score_and_generate(tuned, tokenizer, examples, prompts, cfg, dev, "tuned", on)
    base_gen = row_scores([c.text for c in base_out], refs, e.answer_extraction)
    tuned_gen = row_scores([c.text for c in tuned_out], refs, e.answer_extraction)
    overall = compare(base_scores, tuned_scores, e.bootstrap_resamples, e.bootstrap_seed, e.confidence)
    summary = {
        "base": summarise(base_scores, base_gen, base_out),
        "tuned": summarise(tuned_scores, tuned_gen, tuned_out),
    }
    metric = suite_metric(suite, e.primary_metric)
    if metric not in summary["tuned"]:
        raise ConfigError(
            f"evaluate.suites {suite.name!r}: primary metric {metric!r} needs generations (set its num_generations > 0)"
        )
    low, high = _delta_ci(metric, base_scores, tuned_scores, base_gen, tuned_gen, overall, e)
    result = SuiteResult(
        suite.name,
        metric,
        summary["base"][metric],
        summary["tuned"][metric],
        low,
        high,
        suite_margin(suite, e.regression_margin),
        suite.informational,
    )
    by_row = {
        "base_nll": [s / max(c, 1) for s, c in base_scores],
        "tuned_nll": [s / max(c, 1) for s, c in tuned_scores],
    }
    picked = [rows.index(r) for r in sample]
    table = {
        "id": [r["id"] for r in sample],
        "prompt": [_prompt_text(r["messages"]) for r in sample],
        "reference": [r[0] for r in refs],
        "base_output": [c.text for c in base_out],
        "tuned_output": [c.text for c in tuned_out],
        **{f"base_{k}": v for k, v in base_gen.items()},
        **{f"tuned_{k}": v for k, v in tuned_gen.items()},
        "base_new_tokens": [c.new_tokens for c in base_out],
        "tuned_new_tokens": [c.new_tokens for c in tuned_out],
        **{k: [v[i] for i in picked] for k, v in by_row.items()},
    }
    metrics = {
        **{k: prepared.counts[k] for k in ("read", "rejected", "duplicates", "train_duplicates", "sampled_out")},
        "dropped_tokens": counts["dropped_too_long"] + counts["dropped_no_target"],
        "rows": len(examples),
        "target_tokens": sum(c for _, c in tuned_scores),
        "generations": len(sample),
        "contaminated_prompts": len(prepared.contaminated),
        "contamination_examples": prepared.contaminated[:20],
        **summary,
        **{k: overall[k] for k in ("nll_improvement", "nll_improvement_ci_low", "nll_improvement_ci_high", "win_rate")},
        "confidence": e.confidence,
        "primary_metric": metric,
        "delta": result.tuned - result.base,
        "delta_ci_low": low,
        "delta_ci_high": high,
        "regression_margin": result.margin,
        "informational": suite.informational,
        "regressed": result.regressed,
        "sha256": prepared.sha256,
    }
    dataset = {
        "name": suite.name,
        "digest": prepared.sha256,
        "source": _suite_source(suite),
        "ids": [r["id"] for r in rows],
        "origins": [r["origin"] for r in rows],
    }
    return SuiteRun(suite.name, metrics, result, table, dataset, cached)


def _suite_source(suite: SuiteConfig) -> str:
    if suite.hub is not None:
        return f"https://huggingface.co/datasets/{suite.hub}"

    return str(((package_dir(suite.package) if suite.package else Path(".")) / suite.path).resolve())


def _data_checks(cfg: Config) -> dict[str, Any]:
    stats_file = Path(cfg.paths.curated) / STATS
    passed, note = data_checks(json.loads(stats_file.read_text()) if stats_file.exists() else None)
    return {"passed": passed, "note": note}


def _promotion_preview(cfg: Config, run_info: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """What the promotion gate would decide against today's champion, for the report. The gate itself runs
    after the run is recorded (tracking.promote): evaluation never moves an alias."""
    metric = cfg.evaluate.primary_metric
    if metric not in metrics["tuned"]:
        raise ConfigError(
            f"evaluate.primary_metric={metric!r} was not measured "
            "(set evaluate.num_generations > 0 for generation metrics)"
        )
    store = tracking.store_of(run_info)
    champion = tracking.current_champion(run_info["registered_model"], metric, store, metrics["evaluation"])
    checks = metrics["data_checks"]
    key = metrics["evaluation"]["keys"][metric_family(metric)]
    decision = decide(
        metric,
        metrics["tuned"][metric],
        key,
        run_info["version"],
        champion,
        cfg.evaluate.promotion_margin,
        (checks["passed"], checks["note"]),
        suites=suite_results(metrics),
        base_value=metrics["base"].get(metric),
    )
    reason = decision.reason
    if champion and champion.value is None and champion.version != str(run_info["version"]):
        reason = (
            f"champion v{champion.version} has no {metric} result on this test split with these settings: the "
            "promote step measures it there first, then compares"
        )
    return {
        **decision.as_dict(),
        "alias": f"{decision.alias} (preview)",
        "reason": f"{reason}; applied once the run's data is versioned (the pipeline flow's promote step)",
    }
