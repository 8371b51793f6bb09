"""Stage 4, evaluate: the base and the fine-tuned model side by side on the held-out test split — response
NLL and perplexity on every test row with a paired bootstrap CI of the difference and the win rate (overall
and per source), generations scored against the references — then the HTML report, MLflow, and the
promotion gate. The base model's results are cached (see evalcache)."""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sftops import evalcache, faults, report, tracking
from sftops.chat import IGNORE, Encoded, generation_prompt
from sftops.comparison import compare, compare_by_group
from sftops.config import Config, EvaluateConfig, ModelConfig
from sftops.curate import STATS, prompt_key
from sftops.curves import TRAIN_CURVE, VAL_CURVE, read_curve
from sftops.data.examples import training_examples
from sftops.errors import ConfigError, DataError, GpuMemoryError
from sftops.fingerprints import file_sha256, json_sha256, tokenizer_sha256
from sftops.finetune import device, load_split
from sftops.generation import Completion, Decoding, complete
from sftops.jsonio import read_json, require, write_json
from sftops.modeling import is_adapter, load_base_model, load_finetuned, read_manifest, require_hardware
from sftops.objective import mean_nll, score_rows
from sftops.outputs import replaced_whole
from sftops.promotion import data_checks, decide
from sftops.textmetrics import chrf, extracted_match, length_stats, rouge_l

REPORT_FILE = "report.html"
GENERATIONS_FILE = "generations.csv"
ROWS_FILE = "nll_by_row.csv"


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


def _summary(scores: list[tuple[float, int]], per_row: dict[str, list[float]], completions: list[Completion]) -> dict[str, float]:
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


def decoding(cfg: EvaluateConfig) -> Decoding:
    return Decoding(cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.sample_seed)


def base_eval_params(cfg: Config) -> dict[str, Any]:
    """The settings the base model's scores and outputs depend on (not the scoring rules or statistics)."""
    e = cfg.evaluate
    return {
        "max_length": cfg.model.max_length, "batch_size": e.batch_size, "num_generations": e.num_generations,
        **asdict(decoding(e)),
    }


def eval_sha256(cfg: Config, test_file: Path) -> str:
    """Identity of the test set and everything that shapes a metric on it: two models are comparable on their
    primary metric only when this matches."""
    return json_sha256({"test": file_sha256(test_file), **base_eval_params(cfg), "answer_extraction": cfg.evaluate.answer_extraction})


def _score_and_generate(model, tokenizer, examples: list[Encoded], prompts: list[str], cfg: Config, dev, who: str):
    try:
        faults.out_of_memory(f"evaluate:{who}")
        scores = score_rows(model, examples, cfg.evaluate.batch_size, tokenizer.pad_token_id, dev, desc=f"score {who}")
        completions = complete(model, tokenizer, prompts, decoding(cfg.evaluate), cfg.evaluate.batch_size)
    except torch.OutOfMemoryError:
        smaller = f"evaluate.batch_size={cfg.evaluate.batch_size // 2}, or " if cfg.evaluate.batch_size > 1 else ""
        raise GpuMemoryError(f"evaluating the {who} model ran out of GPU memory. Try {smaller}a smaller "
                             f"evaluate.max_new_tokens (now {cfg.evaluate.max_new_tokens}) or model.max_length") from None
    return scores, completions


def _base_results(cfg, manifest, tuned, tokenizer, examples, prompts, dev, key: str) -> tuple[list, list[Completion], bool]:
    cached = evalcache.load(key)
    # The key covers the data and settings; checking the token counts as well costs nothing.
    expected = [sum(label != IGNORE for label in e.labels[1:]) for e in examples]
    if cached is not None and [c for _, c in cached["scores"]] == expected:
        return [tuple(s) for s in cached["scores"]], [Completion(**c) for c in cached["completions"]], True
    if is_adapter(manifest):
        base, base_mode = tuned, tuned.disable_adapter  # the same weights with the adapter switched off
    else:
        base, base_mode = load_base_model(ModelConfig.model_validate(manifest["base"])).to(dev), contextlib.nullcontext
    base.eval()
    with base_mode():
        scores, completions = _score_and_generate(base, tokenizer, examples, prompts, cfg, dev, "base")
    evalcache.store(key, {"scores": scores, "completions": [asdict(c) for c in completions]})
    return scores, completions, False


def _write_csv(path: Path, table: dict[str, list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(table)
        writer.writerows(zip(*table.values()))


def _prompt_text(messages: list[dict[str, str]]) -> str:
    return messages[-2]["content"] if len(messages) > 1 else ""


def run_evaluate(cfg: Config) -> dict[str, Any]:
    require_hardware("lora", cfg.model.attn_implementation)  # the method trained is done; attention still runs here
    model_dir = Path(cfg.paths.model) / "model"
    run_info = read_json(require(Path(cfg.paths.model) / tracking.RUN_FILE, "train"))
    dev = device()
    tuned, tokenizer = load_finetuned(model_dir)
    tuned.to(dev)
    manifest = read_manifest(model_dir)

    test_file = require(Path(cfg.paths.curated) / "test.parquet", "format")
    rows = load_split(cfg, "test")
    examples, kept, counts = training_examples(cfg, tokenizer, "test", rows)
    if not examples:
        raise DataError(f"no test rows to evaluate on ({counts}); raise data.test_fraction or model.max_length")
    kept_rows = [rows[i] for i in kept]
    sample, refs = generation_sample(kept_rows, cfg.evaluate.num_generations)
    prompts = [generation_prompt(tokenizer, r["messages"]) for r in sample]

    key = evalcache.cache_key(manifest["base"], test_file, tokenizer_sha256(tokenizer), base_eval_params(cfg), dev.type)
    base_scores, base_out, base_cached = _base_results(cfg, manifest, tuned, tokenizer, examples, prompts, dev, key)
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
        "base": _summary(base_scores, base_gen, base_out),
        "tuned": _summary(tuned_scores, tuned_gen, tuned_out),
        "nll_improvement": overall["nll_improvement"],
        "nll_improvement_ci_low": overall["nll_improvement_ci_low"],
        "nll_improvement_ci_high": overall["nll_improvement_ci_high"],
        "confidence": e.confidence,
        "win_rate": overall["win_rate"],
        **length_stats([r[0] for r in refs], "reference"),
        "per_source": compare_by_group(sources, base_scores, tuned_scores, *stats),
    }
    for source, values in metrics["per_source"].items():
        picked = [i for i, r in enumerate(sample) if r.get("source", "all") == source]
        for who, gen in (("base", base_gen), ("tuned", tuned_gen)):
            values.update({f"{who}_{name}": sum(v[i] for i in picked) / len(picked) for name, v in gen.items() if picked})

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
    # The previous reports/ and metrics.json stay until the new ones are complete.
    with replaced_whole(cfg.paths.reports) as reports:
        _write_csv(reports / GENERATIONS_FILE, table)
        _write_csv(reports / ROWS_FILE, per_row)

        decision = _promotion(cfg, run_info, metrics, test_file)
        curves = {
            "train loss": read_curve(Path(cfg.paths.model) / TRAIN_CURVE, "train_loss"),
            "validation NLL": read_curve(Path(cfg.paths.model) / VAL_CURVE, "val_nll"),
        }
        review_rows = [
            {"prompt": _prompt_text(r["messages"]), "reference": r["messages"][-1]["content"],
             "base_nll": per_row["base_nll"][i], "tuned_nll": per_row["tuned_nll"][i]}
            for i, r in enumerate(kept_rows)
        ]
        title = f"{run_info.get('registered_model', 'model')} v{run_info.get('version', '?')} (run {run_info['run_id']})"
        html = report.render(title, metrics, curves, review_rows, table, decision.as_dict())
        (reports / REPORT_FILE).write_text(html, encoding="utf-8")
        write_json(Path(cfg.paths.metrics), metrics)  # with the reports: a failure before here leaves both as they were

        files = [Path(cfg.paths.metrics), reports / REPORT_FILE, reports / ROWS_FILE]
        tracking.log_evaluation(run_info, metrics, table, files, decision)
    return {**metrics, "base_eval_cached": base_cached, "promotion": decision.as_dict(), "report": str(Path(cfg.paths.reports) / REPORT_FILE)}


def _promotion(cfg: Config, run_info: dict[str, Any], metrics: dict[str, Any], test_file: Path):
    """The gate: compare with the current champion on the same test set; apply and return the decision."""
    metric = cfg.evaluate.primary_metric
    if metric not in metrics["tuned"]:
        raise ConfigError(f"evaluate.primary_metric={metric!r} was not measured (set evaluate.num_generations > 0 for generation metrics)")
    stats_file = Path(cfg.paths.curated) / STATS
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else None
    identity = eval_sha256(cfg, test_file)
    champion = tracking.current_champion(run_info["registered_model"], metric, tracking.store_of(run_info))
    decision = decide(metric, metrics["tuned"][metric], identity, run_info["version"], champion, cfg.evaluate.promotion_margin, data_checks(stats))
    tracking.apply_decision(run_info, decision, identity)
    return decision
