"""Model review against real things: SFT of the pre-trained stories260K on GSM8K lowers the held-out response
NLL with a bootstrap interval that excludes zero; and a real `mlflow server` on loopback holds the run and the
registry, from which the champion answers."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from mlflow import MlflowClient

from conftest import QA, qa_rows, write_jsonl, write_project
from realstack import evaluation_runs
from sftops.cli import main
from sftops.config import ModelConfig, TrainConfig
from sftops.data.examples import encode_curated_rows
from sftops.evaluate.comparison import compare
from sftops.modeling import load_base_model, load_tokenizer
from sftops.stages.evaluate import run_evaluate
from sftops.stages.format import run_format
from sftops.stages.ingest import run_ingest
from sftops.stages.train import run_train
from sftops.tracking import registry
from sftops.tracking.tags import ANYWHERE, RESTORABLE
from sftops.train.loop import train_loop
from sftops.train.lora import apply_method
from sftops.train.loss import score_rows
from sftops.train.setup import seed_everything


def gsm8k_conversations(path: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [
        {"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
        for r in rows
    ]


def test_sft_lowers_held_out_gsm8k_response_nll_beyond_the_bootstrap_interval(stories_model, gsm8k):
    import torch

    model_cfg = ModelConfig(base=str(stories_model), max_length=320)
    tokenizer = load_tokenizer(model_cfg)
    train, _, _ = encode_curated_rows(tokenizer, gsm8k_conversations(gsm8k / "train.jsonl", 160), model_cfg.max_length)
    test, _, _ = encode_curated_rows(tokenizer, gsm8k_conversations(gsm8k / "test.jsonl", 60), model_cfg.max_length)
    assert len(train) >= 40 and len(test) >= 15
    cpu = torch.device("cpu")
    seed_everything(0)
    model = load_base_model(model_cfg)
    base = score_rows(model, test, 16, tokenizer.pad_token_id, cpu)
    train_cfg = TrainConfig(method="full", max_steps=12, micro_batch_size=4, learning_rate=0.004, warmup_ratio=0.1)
    model = apply_method(model, train_cfg)
    train_loop(model, train, train_cfg, tokenizer.pad_token_id)  # a world of one process, on the CPU
    tuned = score_rows(model, test, 16, tokenizer.pad_token_id, cpu)
    result = compare(base, tuned, resamples=2000, seed=0, confidence=0.95)
    print(
        f"GSM8K test response NLL {result['base_nll']:.2f} -> {result['tuned_nll']:.2f} nats/token, "
        f"95% CI of the gain [{result['nll_improvement_ci_low']:.2f}, {result['nll_improvement_ci_high']:.2f}], "
        f"win rate {result['win_rate']:.2f} over {result['rows']} rows"
    )
    assert result["nll_improvement_ci_low"] > 0


def test_a_real_mlflow_server_holds_the_review_and_the_champion_answers_from_it(
    project_folder, tiny_model, monkeypatch, mlflow_server, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = write_project(
        tiny_model,
        [{"name": "qa", "path": str(write_jsonl("in.jsonl", qa_rows(60, QA[:1])))}],
        train={"method": "lora", "max_steps": 2, "micro_batch_size": 8, "learning_rate": 0.01},
        evaluate={"num_generations": 0, "bootstrap_resamples": 200},  # NLL only: the server is what is tested
        tracking={"registered_model_name": "served"},
    )
    run_ingest(cfg)
    run_format(cfg)
    run = run_train(cfg)
    metrics = run_evaluate(cfg).metrics
    record = asdict(run)  # run.json, as the pipeline flow's record and promote steps read it
    # as the flow tags a run it pushed: on a shared server only a record restorable anywhere can be champion
    registry.record_version(record, {registry.VERSIONED: "true", RESTORABLE: ANYWHERE})
    assert registry.promote(record, metrics, "nll", 0.0).alias == "champion"
    client = MlflowClient(mlflow_server)
    assert str(client.get_model_version_by_alias("served", "champion").version) == run.version
    [evaluated] = evaluation_runs(client, run.run_id)
    artifacts = {a.path for a in client.list_artifacts(evaluated.info.run_id, "eval")}
    assert {"eval/report.html", "eval/nll_by_row.csv"} <= artifacts
    assert "eval/promotion.json" in {a.path for a in client.list_artifacts(run.run_id, "eval")}
    assert evaluated.data.metrics["test_win_rate"] == metrics["win_rate"]
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                "models:/served@champion",
                "--prompt",
                "what is two plus two?",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("> what is two plus two?\n")
