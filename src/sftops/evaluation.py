"""Stage 4, evaluate: the base and the fine-tuned model side by side on the held-out test split —
response NLL and perplexity on every test row, and generations scored against the references."""

from __future__ import annotations

import contextlib
import csv
import math
from pathlib import Path
from typing import Any

from sftops import tracking
from sftops.chat import generation_prompt
from sftops.config import Config, ModelConfig
from sftops.curate import prompt_key
from sftops.data.examples import training_examples
from sftops.errors import DataError
from sftops.finetune import device, load_split
from sftops.generation import generate
from sftops.jsonio import read_json, require, write_json
from sftops.modeling import is_adapter, load_base_model, load_finetuned, read_manifest
from sftops.objective import mean_nll, score_rows
from sftops.textmetrics import exact_match, rouge_l


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


def best(score, output: str, references: list[str]) -> float:
    """A prompt with several valid answers is scored against the closest one."""
    return max(score(output, r) for r in references)


def row_scores(outputs: list[str], refs: list[list[str]]) -> dict[str, list[float]]:
    """Per generated answer: exact match and ROUGE-L against its closest reference."""
    return {
        "exact_match": [best(exact_match, o, r) for o, r in zip(outputs, refs)],
        "rouge_l": [best(rouge_l, o, r) for o, r in zip(outputs, refs)],
    }


def _summary(scores: list[tuple[float, int]], per_row: dict[str, list[float]]) -> dict[str, float]:
    nll = mean_nll(scores)
    out = {"nll": nll, "perplexity": math.exp(nll)}
    for name, values in per_row.items():
        if values:
            out[name] = sum(values) / len(values)
    return out


def run_evaluate(cfg: Config) -> dict[str, Any]:
    model_dir = Path(cfg.paths.model) / "model"
    run_info = read_json(require(Path(cfg.paths.model) / tracking.RUN_FILE, "train"))
    dev = device()
    tuned, tokenizer = load_finetuned(model_dir)
    tuned.to(dev)
    manifest = read_manifest(model_dir)
    if is_adapter(manifest):
        base, base_mode = tuned, tuned.disable_adapter  # the same weights with the adapter switched off
    else:
        base, base_mode = load_base_model(ModelConfig.model_validate(manifest["base"])).to(dev), contextlib.nullcontext
    base.eval()

    rows = load_split(cfg, "test")
    examples, kept, counts = training_examples(cfg, tokenizer, "test", rows)
    if not examples:
        raise DataError(f"no test rows to evaluate on ({counts}); raise data.test_fraction or model.max_length")
    pad = tokenizer.pad_token_id
    with base_mode():
        base_scores = score_rows(base, examples, cfg.evaluate.batch_size, pad, dev, desc="score base")
    tuned_scores = score_rows(tuned, examples, cfg.evaluate.batch_size, pad, dev, desc="score tuned")

    sample, refs = generation_sample([rows[i] for i in kept], cfg.evaluate.num_generations)
    prompts = [generation_prompt(tokenizer, r["messages"]) for r in sample]
    args = (tokenizer, prompts, cfg.evaluate.max_new_tokens, cfg.evaluate.batch_size)
    with base_mode():
        base_out = generate(base, *args)
    tuned_out = generate(tuned, *args)
    base_rows, tuned_rows = row_scores(base_out, refs), row_scores(tuned_out, refs)

    metrics = {
        "test_rows": len(examples),
        "test_target_tokens": sum(c for _, c in tuned_scores),
        "generations": len(sample),
        "base": _summary(base_scores, base_rows),
        "tuned": _summary(tuned_scores, tuned_rows),
    }
    metrics["nll_improvement"] = metrics["base"]["nll"] - metrics["tuned"]["nll"]
    write_json(Path(cfg.paths.metrics), metrics)

    table = {
        "prompt": [r["messages"][-2]["content"] if len(r["messages"]) > 1 else "" for r in sample],
        "reference": [r[0] for r in refs],
        "other_references": [len(r) - 1 for r in refs],
        "base_output": base_out,
        "tuned_output": tuned_out,
        **{f"base_{name}": values for name, values in base_rows.items()},
        **{f"tuned_{name}": values for name, values in tuned_rows.items()},
        "source": [r["source"] for r in sample],
    }
    reports = Path(cfg.paths.reports)
    reports.mkdir(parents=True, exist_ok=True)
    with (reports / "generations.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(table)
        writer.writerows(zip(*table.values()))

    tracking.log_evaluation(run_info, metrics, table, Path(cfg.paths.metrics))
    return metrics
