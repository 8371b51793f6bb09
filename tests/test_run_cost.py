"""What a run cost is recorded where a team paying for GPU hours looks: run.json and the MLflow training run
(tokens, throughput, memory, device-hours, the price), metrics.json, the report and the registered version's
description (cost per 0.1 nats of test NLL improvement over the base and the champion)."""

import json

import pytest
from mlflow import MlflowClient

from conftest import TINY_LLAMA, formatted, qa_rows, write_jsonl, write_project
from sftops.accelerator import peak_for_name
from sftops.data.examples import split_examples
from sftops.evaluate.cost import cost_line
from sftops.modeling import load_base_model, load_tokenizer
from sftops.stages.evaluate import run_evaluate
from sftops.stages.train import run_train
from sftops.tracking.registry import describe_version
from sftops.train.cost import matmul_params, training_flops
from sftops.train.lora import apply_method


@pytest.fixture
def priced(project_folder, tiny_model):
    sources = [{"name": "qa", "path": str(write_jsonl("in.jsonl", qa_rows(30)))}]
    return formatted(
        write_project(
            tiny_model,
            sources,
            # rows one at a time: one epoch takes each row exactly once, however many there are
            train={"method": "lora", "epochs": 1, "micro_batch_size": 1, "grad_accum_steps": 1, "learning_rate": 0.01},
            evaluate={"num_generations": 2, "max_new_tokens": 4, "bootstrap_resamples": 50},
            cost={"per_device_hour": 2.5, "currency": "EUR"},
        )
    )


def test_a_training_run_records_what_it_cost_in_run_json_and_mlflow(priced, project_folder):
    report = run_train(priced)
    cost = json.loads((project_folder / "models/run.json").read_text())["cost"]
    # One epoch trains every row once: the tokens counted step by step are the train split's, all of them.
    examples = split_examples(priced, load_tokenizer(priced.model), "train").examples
    assert cost["tokens"] == sum(len(e.input_ids) for e in examples)
    assert cost["supervised_tokens"] == sum(step["supervised_tokens"] for step in report.history)
    assert 0 < cost["supervised_tokens"] < cost["tokens"]  # prompts are not targets
    assert set(cost["wall_s_by_phase"]) == {"load", "setup", "train", "export"}
    assert sum(cost["wall_s_by_phase"].values()) <= cost["wall_s"]
    assert cost["device_hours"] == pytest.approx(cost["wall_s"] / 3600)  # one CPU machine
    assert cost["amount"] == pytest.approx(cost["device_hours"] * 2.5) and cost["currency"] == "EUR"
    assert cost["mfu"] is None and "not computed" in cost["mfu_note"]  # no dense peak for a CPU
    assert cost["peak_rss_gib"] > 0 and cost["peak_allocated_gib"] is None
    assert cost["energy_kwh"] is None and cost["energy_note"]
    logged = MlflowClient(report.tracking_uri).get_run(report.run_id).data.metrics
    assert logged["cost/amount"] == pytest.approx(cost["amount"])
    assert logged["cost/tokens_per_s"] == pytest.approx(cost["tokens_per_s"])
    assert logged["cost/wall_s/train"] == pytest.approx(cost["wall_s_by_phase"]["train"])

    metrics = run_evaluate(priced).metrics
    improvement = metrics["base"]["nll"] - metrics["tuned"]["nll"]
    assert improvement > 0
    assert metrics["cost"]["amount_per_0.1_nats_over_base"] == pytest.approx(cost["amount"] / (improvement / 0.1))
    html = (project_folder / "reports/report.html").read_text()
    assert "What it cost" in html and "per 0.1 nats of test NLL improvement over the base" in html


def test_a_given_dense_peak_gives_an_mfu_on_cpu(priced, project_folder):
    cfg = priced.model_copy(update={"cost": priced.cost.model_copy(update={"peak_tflops": 1.0})})
    cost = run_train(cfg).cost
    assert cost["peak_tflops"] == 1.0 and cost["mfu_note"] is None
    # two CPU cores do well under a dense TFLOP/s (2 x 32 float32 FLOPs per cycle at ~3 GHz: about 0.2)
    assert 0 < cost["mfu"] < 1
    assert cost["mfu"] == pytest.approx(cost["model_flops"] / (cost["step_s_mean"] * cost["steps_measured"] * 1e12))


def test_model_flops_count_the_tiny_llama_by_hand(tiny_model, tmp_path):
    """The matrix weights of TINY_LLAMA with LoRA r=16 on every linear layer, counted by hand from its config."""
    cfg = write_project(tiny_model, [{"name": "x", "path": "x.jsonl"}], tmp_path, train={"method": "lora"})
    model = apply_method(load_base_model(cfg.model), cfg.train)
    h, i, layers = TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"], TINY_LLAMA["num_hidden_layers"]
    kv = TINY_LLAMA["num_key_value_heads"] * h // TINY_LLAMA["num_attention_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down: (in, out)
    vocab = model.get_base_model().config.vocab_size
    counted = matmul_params(model)
    assert counted.frozen == layers * sum(a * b for a, b in shapes)
    assert counted.trained == layers * sum(16 * (a + b) for a, b in shapes)
    assert (counted.head_frozen, counted.head_trained) == (h * vocab, 0)
    tokens, supervised, rows = 1000, 400, 10
    by_hand = (
        tokens * (4 * counted.frozen + 6 * counted.trained + 3 * 2 * layers * h * tokens / rows)
        + supervised * 4 * h * vocab
    )
    assert training_flops(counted, tokens, supervised, rows) == pytest.approx(by_hand)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA H200", 989.0),
        ("Some Future GPU", None),
    ],
)
def test_dense_peaks_are_found_by_the_gpu_name(name, peak):
    assert peak_for_name(name) == peak


def test_the_description_prices_the_improvement_over_base_and_champion():
    cost = {
        "device": "NVIDIA H100 80GB HBM3",
        "wall_s": 3600.0,
        "device_hours": 2.0,
        "energy_kwh": 1.2,
        "mfu": 0.41,
        "amount": 8.0,
        "currency": "USD",
        "nll_improvement_over_base": 0.4,
        "amount_per_0.1_nats_over_base": 2.0,
        "device_hours_per_0.1_nats_over_base": 0.5,
    }
    decision = {
        "alias": "champion",
        "reason": "better",
        "metric": "nll",
        "value": 1.5,
        "champion_version": "3",
        "champion_value": 1.7,
    }
    line = cost_line(cost, decision)
    # 0.2 nats over the champion: two units of 0.1 for 8.00 USD and 2 device-hours.
    assert "4.00 USD and 1.0000 device-hours per 0.1 nats of test NLL improvement over the champion v3" in line
    metrics = {
        "confidence": 0.95,
        "base": {"nll": 1.9},
        "tuned": {"nll": 1.5},
        "nll_improvement": 0.4,
        "nll_improvement_ci_low": 0.3,
        "nll_improvement_ci_high": 0.5,
        "win_rate": 0.8,
        "test_rows": 10,
        "evaluation": {"dataset": {"name": "test", "digest": "abc"}},
        "cost": cost,
    }
    text = describe_version({"run_id": "r"}, {}, {}, metrics, decision, None, "sqlite:///x.db")
    assert f"**Cost**: {line}" in text
    assert cost_line(cost, {**decision, "champion_value": 1.4}).endswith(
        "no test NLL improvement over the champion v3 to price"
    )
