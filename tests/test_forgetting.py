"""Forgetting tracked during training and the checkpoint chosen with it, and drift suites (reference: base).
Without a model: which step the selection exports and why, and the gate refusing a run none of whose validations
stayed within budget. On the tiny model, the stages as production runs them: a drift suite's references are the
base model's own greedy answers (checked against transformers' generate, called here directly), every validation
scores the suite (run.json, MLflow's per-step history, suite_curve.csv, the report's chart), and an impossible
budget leaves the run refused with the reason in one line. Checkpoint selection on a real model and real data
(an earlier step chosen when later ones break the budget): tests/test_suites_real.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from conftest import arithmetic_rows, formatted, write_jsonl, write_project
from sftops.chat import generation_prompt
from sftops.evaluate.promotion import CHALLENGER, CHAMPION, decide
from sftops.layout import MODEL_DIR, SUITE_CURVE
from sftops.stages.evaluate import run_evaluate
from sftops.stages.train import run_train
from sftops.tracking import registry
from sftops.train.forgetting import selection_of

BROKE = "suite 'general' length_ratio 0.2000 (...), floor 0.5"


def validations(*rows: tuple[int, float, str]) -> list[dict]:
    return [{"step": step, "val_nll": nll, "broken": broken} for step, nll, broken in rows]


def test_the_export_is_the_lowest_validation_nll_among_the_steps_within_budget():
    vals = validations((10, 2.0, ""), (20, 1.6, ""), (30, 1.2, BROKE), (40, 1.1, BROKE))
    chosen = selection_of(vals, 20, 40)
    assert chosen["step"] == 20 and chosen["within_budget"] is True
    assert chosen["reason"] == (
        "step 20 of 40: the lowest validation NLL (1.6000) among the 2 of 4 validations within every blocking "
        "suite's budget; later steps broke a budget (30, 40)"
    )
    assert selection_of(validations((10, 2.0, ""), (20, 1.6, "")), 20, 20)["reason"].endswith("suite's budget")


def test_when_no_validation_is_within_budget_the_last_step_is_exported_and_the_gate_refuses_it_in_one_line():
    chosen = selection_of(validations((10, 2.0, BROKE), (20, 1.6, BROKE)), 0, 20)
    assert chosen["step"] == 20 and chosen["within_budget"] is False
    assert f"at step 10: {BROKE}" in chosen["reason"] and "is not promoted" in chosen["reason"]
    refused = decide("nll", 1.5, "key", "3", None, 0.0, base_value=2.0, selection=chosen)
    assert refused.alias == CHALLENGER and refused.reason == f"during training, {chosen['reason']}"
    assert "\n" not in refused.reason
    within = selection_of(validations((10, 2.0, "")), 10, 10)
    assert decide("nll", 1.5, "key", "3", None, 0.0, base_value=2.0, selection=within).alias == CHAMPION
    unvalidated = selection_of([], 0, 7)  # train.eval_every null: nothing to choose from, nothing refused
    assert unvalidated == {
        "step": 7,
        "within_budget": None,
        "reason": "step 7, the last: no validation during training (train.eval_every is null)",
    }
    assert decide("nll", 1.5, "key", "3", None, 0.0, selection=unvalidated).alias == CHAMPION


def drift_project(tiny_model, floor: float):
    write_jsonl("general.jsonl", [{"prompt": f"tell me something about the number {i}."} for i in range(10)])
    qa = [{"name": "qa", "path": str(write_jsonl("qa.jsonl", arithmetic_rows(60)))}]
    return formatted(
        write_project(
            tiny_model,
            qa,
            train={"method": "lora", "max_steps": 4, "micro_batch_size": 4, "eval_every": 2, "suite_rows": 6},
            evaluate={
                "num_generations": 2,
                "max_new_tokens": 6,
                "bootstrap_resamples": 100,
                "suites": [
                    {
                        "name": "general",
                        "path": "general.jsonl",
                        "reference": "base",
                        "num_generations": 4,
                        "regression_margin": 50.0,
                        "min_length_ratio": floor,
                    }
                ],
            },
        )
    )


def read_rows(path: Path | str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_a_drift_suite_is_scored_at_every_validation_against_the_base_models_own_answers(project_folder, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = drift_project(tiny_model, floor=0.0)
    run = run_train(cfg)
    assert [v["step"] for v in run.validations] == [2, 4]
    for v in run.validations:
        assert {"suite/general/nll", "suite/general/nll_change", "suite/general/length_ratio"} <= set(v)
    assert run.suite_baseline["suite/general/nll_change"] == 0 and run.suite_baseline["suite/general/length_ratio"] == 1
    assert run.selection["within_budget"] is True and run.selection["step"] in (2, 4)
    best = min(run.validations, key=lambda v: v["val_nll"])
    assert run.selection["step"] == best["step"]  # nothing broken: the lowest validation NLL, as before suites

    history = MlflowClient(run.tracking_uri).get_metric_history(run.run_id, "suite/general/nll")
    assert [(m.step, m.value) for m in history] == [(v["step"], v["suite/general/nll"]) for v in run.validations]
    curve = read_rows(Path(cfg.paths.model) / SUITE_CURVE)
    assert [(int(r["step"]), r["suite"], r["within_budget"]) for r in curve] == [
        (0, "general", "1"),
        (2, "general", "1"),
        (4, "general", "1"),
    ]
    assert float(curve[2]["nll"]) == pytest.approx(run.validations[1]["suite/general/nll"])

    metrics = run_evaluate(cfg).metrics
    suite = metrics["suites"]["general"]
    assert suite["read"] == 10 and metrics["selection"] == run.selection
    # The references are the base model's greedy answers: transformers' generate on the base, called directly.
    tokenizer = AutoTokenizer.from_pretrained(Path(cfg.paths.model) / MODEL_DIR)  # with the chat template trained on
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    table = read_rows("reports/suites/general.csv")
    assert len(table) == 4
    for row in table:
        prompt = generation_prompt(tokenizer, [{"role": "user", "content": row["prompt"]}, {"role": "assistant"}])
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = base.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert row["reference"] == answer == row["base_output"]
    html = Path("reports/report.html").read_text()
    assert "Forgetting during training" in html and f"Exported step {run.selection['step']}: " in html


def test_a_budget_no_validation_meets_leaves_the_run_refused_with_the_reason(project_folder, tiny_model):
    cfg = drift_project(tiny_model, floor=100.0)  # answers 100 times longer than the base's: never
    run = run_train(cfg)
    assert all("suite 'general' length_ratio" in v["broken"] for v in run.validations)
    assert run.selection["within_budget"] is False and run.selection["step"] == run.steps == 4
    metrics = run_evaluate(cfg).metrics
    decision, _ = registry.gate(json.loads((Path(cfg.paths.model) / "run.json").read_text()), metrics, "nll", 0.0)
    assert decision.alias == CHALLENGER
    assert decision.reason.startswith("during training, no validated checkpoint stayed within every blocking suite's")
    curve = read_rows(Path(cfg.paths.model) / SUITE_CURVE)
    assert [r["within_budget"] for r in curve] == ["1", "0", "0"]
