"""Stage 4, evaluate: the base and the fine-tuned model side by side on the held-out test split — response
NLL and perplexity on every test row with a paired bootstrap CI of the difference and the win rate (overall
and per source), generations scored against the references, how the answers changed (length, degenerate
answers, stop rate: evaluate/behaviour.py) — and the same on each regression suite (evaluate.suites); then the
HTML report, metrics.json, and the evaluation as an MLflow run. The base model's results are cached
(evaluate/base_cache.py). The promotion gate is previewed in the report; the pipeline flow applies it
(tracking/registry.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftops import faults
from sftops.config import Config
from sftops.data.store import load_split
from sftops.evaluate import base_cache, report
from sftops.evaluate.cost import cost_beside_quality
from sftops.evaluate.drift import with_base_references
from sftops.evaluate.held_out import read_test_split
from sftops.evaluate.identity import base_eval_params, evaluation_identity
from sftops.evaluate.parity import PARITY_BLOCK
from sftops.evaluate.review import generations_table, per_row_table, review_metrics, review_rows, write_csv
from sftops.evaluate.sides import BaseSwitch, EvalSet, Side, base_side, run_side
from sftops.evaluate.suite_scores import SuiteRun, evaluate_suite
from sftops.evaluate.suites import SuiteRows, prepare_suite
from sftops.jsonio import read_json, require, write_json
from sftops.layout import (
    GENERATIONS_FILE,
    MODEL_DIR,
    REPORT_FILE,
    ROWS_FILE,
    RUN_FILE,
    SUITE_CURVE,
    SUITES_DIR,
    TRAIN_CURVE,
    VAL_CURVE,
)
from sftops.machine import device, require_hardware
from sftops.modeling import load_finetuned, read_manifest
from sftops.outputs import replaced_whole
from sftops.provenance.fingerprints import file_sha256, tokenizer_sha256
from sftops.tracking.evaluations import log_evaluation
from sftops.tracking.feedback import labels_so_far
from sftops.tracking.parity import check_serving
from sftops.tracking.registry import preview
from sftops.train.curves import read_curve, read_suite_rows


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, Any]  # what metrics.json holds
    report: Path
    base_eval_cached: bool  # the base model's test split results came from the cache
    suites_base_eval_cached: dict[str, bool]


@dataclass(frozen=True)
class Review:
    """The test split reviewed, in the shapes the report, the CSVs and MLflow take."""

    metrics: dict[str, Any]
    per_row: dict[str, list]
    generations: dict[str, list]
    rows: list[dict[str, Any]]


def run_evaluate(cfg: Config) -> EvaluateResult:
    require_hardware("lora", cfg.model.attn_implementation)  # the method trained is done; attention still runs here
    suites = prepare_suites(cfg)  # a missing or empty suite stops the stage before any model is loaded
    run_info = read_json(require(Path(cfg.paths.model) / RUN_FILE, "train"))
    test_file = require(Path(cfg.paths.curated) / "test.parquet", "format")
    dev = device()
    tuned, tokenizer = load_finetuned(Path(cfg.paths.model) / MODEL_DIR)
    tuned.to(dev)
    base = BaseSwitch(read_manifest(Path(cfg.paths.model) / MODEL_DIR), tuned, dev)

    measured = measure(cfg, tuned, tokenizer, base, test_file, suites, dev)
    review, suite_runs = measured.review, measured.suite_runs
    # the registered version, run as a server runs it, must answer as the model just evaluated (the gate reads it)
    review.metrics[PARITY_BLOCK] = check_serving(cfg, run_info, tuned, tokenizer, measured.test, measured.tuned)
    cost = cost_beside_quality(run_info.get("cost"), review.metrics)  # what the training run cost, per 0.1 nats
    if cost:
        review.metrics["cost"] = cost
    if run_info.get("selection"):  # which step training exported and why: the gate refuses one outside budget
        review.metrics["selection"] = run_info["selection"]

    files = write_review(cfg, run_info, review, suite_runs)
    # The files are in place before MLflow hears of them: the registry's alias moves last, so a failure in
    # between leaves files newer than the registry (a re-run logs again), never a champion without its report.
    faults.pause("evaluate_logging")
    log_evaluation(
        run_info,
        review.metrics,
        review.generations,
        files,
        [r.dataset for r in suite_runs],
        test_file,
        suite_tables={r.name: r.table for r in suite_runs},
    )
    return EvaluateResult(
        metrics=review.metrics,
        report=Path(cfg.paths.reports) / REPORT_FILE,
        base_eval_cached=measured.base.cached,
        suites_base_eval_cached={run.name: run.base_cached for run in suite_runs},
    )


@dataclass(frozen=True)
class Measured:
    test: EvalSet
    base: Side
    tuned: Side
    review: Review  # the test split reviewed, the suites' results in its metrics
    suite_runs: list[SuiteRun]


def measure(cfg: Config, tuned, tokenizer, base: BaseSwitch, test_file: Path, suites: list[SuiteRows], dev) -> Measured:
    """Base and tuned side by side on the test split in cfg.paths.curated and on each suite."""
    test = read_test_split(cfg, tokenizer)
    key = base_cache.cache_key(
        base.manifest["base"], file_sha256(test_file), tokenizer_sha256(tokenizer), base_eval_params(cfg), dev.type
    )
    base_run = base_side(base, tokenizer, test, cfg, dev, key)
    tuned_run = run_side(tuned, tokenizer, test, cfg, dev, "tuned")
    review = review_test_split(cfg, test, base_run, tuned_run, evaluation_identity(cfg, test_file, tokenizer))
    suites = [with_base_references(cfg, s, rows, base, tokenizer, dev) for s, rows in zip(cfg.evaluate.suites, suites)]
    suite_runs = [
        evaluate_suite(cfg, s, rows, tuned, base, tokenizer, dev) for s, rows in zip(cfg.evaluate.suites, suites)
    ]
    if suite_runs:
        review.metrics["suites"] = {run.name: run.metrics for run in suite_runs}
    return Measured(test, base_run, tuned_run, review, suite_runs)


def prepare_suites(cfg: Config) -> list[SuiteRows]:
    """Each regression suite read, mapped and checked against the train split."""
    train_rows = load_split(cfg, "train") if cfg.evaluate.suites else []
    return [prepare_suite(s, train_rows, cfg.data, cfg.evaluate.sample_seed) for s in cfg.evaluate.suites]


def review_test_split(cfg: Config, test: EvalSet, base: Side, tuned: Side, identity: dict[str, Any]) -> Review:
    per_row = per_row_table(test, base, tuned)
    return Review(
        metrics=review_metrics(cfg, test, base, tuned, identity),
        per_row=per_row,
        generations=generations_table(test, base, tuned, per_row),
        rows=review_rows(test, per_row),
    )


def write_review(cfg: Config, run_info: dict[str, Any], review: Review, suite_runs: list[SuiteRun]) -> list[Path]:
    """reports/ (the tables, the HTML report with the gate's preview) and metrics.json, replaced whole: a failure
    before the end leaves the previous ones as they were. Returns the files MLflow keeps."""
    reports, metrics_file = Path(cfg.paths.reports), Path(cfg.paths.metrics)
    with replaced_whole(reports) as out:
        write_csv(out / GENERATIONS_FILE, review.generations)
        write_csv(out / ROWS_FILE, review.per_row)
        for run in suite_runs:
            write_csv(out / SUITES_DIR / f"{run.name}.csv", run.table)
        decision = preview(run_info, review.metrics, cfg.evaluate.primary_metric, cfg.evaluate.promotion_margin)
        curves = {
            "train loss": read_curve(Path(cfg.paths.model) / TRAIN_CURVE, "train_loss"),
            "validation NLL": read_curve(Path(cfg.paths.model) / VAL_CURVE, "val_nll"),
        }
        title = (
            f"{run_info.get('registered_model', 'model')} v{run_info.get('version', '?')} (run {run_info['run_id']})"
        )
        worst = {run.name: run.most_worse() for run in suite_runs}
        suite_curve = read_suite_rows(Path(cfg.paths.model) / SUITE_CURVE)
        html = report.render(
            title,
            review.metrics,
            curves,
            review.rows,
            review.generations,
            decision,
            worst,
            suite_curve=suite_curve,
            feedback=labels_so_far(run_info, cfg.evaluate),
        )
        (out / REPORT_FILE).write_text(html, encoding="utf-8")
        write_json(metrics_file, reproducible(review.metrics))
    return [metrics_file, reports / REPORT_FILE, reports / ROWS_FILE] + [
        reports / SUITES_DIR / f"{run.name}.csv" for run in suite_runs
    ]


# Figures measured by the clock: the run's record (run.json) and MLflow keep them; metrics.json, a DVC output,
# holds only what the same inputs give again (dvc repro, the flow and a deployment write the same file).
TIMED = ("cost", "load_seconds", "answer_seconds")


def reproducible(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json's content: the evaluation without the figures measured by the clock (the run's cost, the
    seconds the served model took, what watching the suites cost)."""
    kept = {k: v for k, v in metrics.items() if k not in TIMED}
    for block in ("selection", PARITY_BLOCK):
        if isinstance(kept.get(block), dict):
            kept[block] = {k: v for k, v in kept[block].items() if k not in TIMED}
    return kept


# The same evaluation on a registered version the pipeline did not make (the registry-events flow runs it).


@dataclass(frozen=True)
class VersionEvaluation:
    model_uri: str
    outcome: str  # evaluated | already evaluated | evaluated by the pipeline
    evaluation_run_id: str | None
    reason: str


def evaluate_version(cfg: Config, model_uri: str, store: str) -> VersionEvaluation:
    """Evaluate registered version models:/NAME/VERSION as the evaluate stage evaluates the pipeline's model (base
    and tuned on the test split, every suite of cfg.evaluate.suites, the report) on the champion's test split,
    and log it as the version's evaluation run. Nothing is done for a version that has an evaluation, or that
    the pipeline's train stage registered (its evaluate stage evaluates it)."""
    import tempfile

    from sftops.redact import redact
    from sftops.tracking import version_evaluation as versions
    from sftops.tracking.models import local_model_dir

    name, version = versions.parse_version(model_uri)
    made_by = versions.pipeline_run_of(store, name, version)
    done = versions.evaluations_of(store, name, version)
    if made_by:
        has = f" (evaluation run {done[0]})" if done else ""
        return VersionEvaluation(
            model_uri,
            "evaluated by the pipeline",
            done[0] if done else None,
            f"registered by the train stage of run {made_by}: the pipeline's evaluate stage evaluates it{has}",
        )
    if done:
        return VersionEvaluation(model_uri, "already evaluated", done[0], f"evaluation run {done[0]} has its results")
    run_id = versions.training_run_of(store, name, version)
    with tempfile.TemporaryDirectory(prefix="sftops-version-") as tmp:
        reference = versions.champion_split(store, name, version, Path(tmp) / "curated")
        local = _scratch_paths(cfg, Path(tmp), reference.curated)
        suites = [prepare_suite(s, [], cfg.data, cfg.evaluate.sample_seed) for s in cfg.evaluate.suites]
        model_dir = local_model_dir(model_uri, store)
        dev = device()
        tuned, tokenizer = load_finetuned(model_dir)
        tuned.to(dev)
        base = BaseSwitch(_base_of(cfg, read_manifest(model_dir)), tuned, dev)
        test_file = reference.curated / "test.parquet"
        measured = measure(local, tuned, tokenizer, base, test_file, suites, dev)
        run_info = {"run_id": run_id, "registered_model": name, "version": version, "tracking_uri": redact(store)}
        files = write_review(local, run_info, measured.review, measured.suite_runs)
        datasets = [r.dataset for r in measured.suite_runs]
        evaluated = log_evaluation(
            run_info,
            measured.review.metrics,
            measured.review.generations,
            files,
            datasets,
            test_file,
            reference.source,
            store,
        )
    return VersionEvaluation(
        model_uri,
        "evaluated",
        evaluated,
        f"on champion's test split (evaluation run {reference.evaluation_run_id}) and {len(suites)} suite(s)",
    )


def _scratch_paths(cfg: Config, folder: Path, curated: Path) -> Config:
    """cfg with its curated data, model, reports and metrics in `folder`: the project's own outputs (DVC's) are
    left alone."""
    paths = cfg.paths.model_copy(
        update={
            "curated": str(curated),
            "model": str(folder / "model"),
            "reports": str(folder / "reports"),
            "metrics": str(folder / "metrics.json"),
        }
    )
    return cfg.model_copy(update={"paths": paths})


def _base_of(cfg: Config, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest the base side loads the base from. A registered full-weights model names a local base folder
    without its path (tracking/models.py shown_base); it is the project's model.base when the names agree."""
    from sftops.errors import ConfigError
    from sftops.tracking.models import shown_base

    named = manifest["base"]["base"]
    if not str(named).startswith("local folder "):
        return manifest
    if named != shown_base(cfg.model.base):
        raise ConfigError(
            f"the version was fine-tuned from {named}, params.yaml model.base is {cfg.model.base!r}: set model.base "
            "to that base to evaluate it"
        )
    return {**manifest, "base": {**manifest["base"], **cfg.model.model_dump()}}
