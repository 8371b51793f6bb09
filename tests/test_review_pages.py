"""The pages a reviewer lands on in the MLflow UI, checked on one tiny pipeline (train, evaluate, promote) with a
real MLflow SQLite store: the experiment opens on the model-training view, the training run's and the logged
model's val_nll is the value after training, the logged model is named after the registered model and carries
only what was measured on it, constants are params, only the launch settings that applied are logged, the
evaluation run holds a base-vs-tuned table, the version's description links the pages in order, the report shows
the decision, and `sftops generate --base` answers with the base model."""

from __future__ import annotations

import csv
import html
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from conftest import QA, formatted, qa_rows, write_jsonl, write_project
from realstack import evaluation_runs
from sftops.cli import main
from sftops.modeling import load_finetuned
from sftops.stages.evaluate import run_evaluate
from sftops.stages.train import run_train
from sftops.tracking import evaluations, pages, registry
from sftops.tracking.models import logged_model_name

# LoRA, validated every 5 steps of 20 at a high rate: the curve has several points and the last step validates too.
TRAIN = {"method": "lora", "max_steps": 20, "micro_batch_size": 8, "learning_rate": 0.05, "eval_every": 5}


@pytest.fixture
def reviewed(project_folder, tiny_model, monkeypatch):
    """The tiny model trained, evaluated and promoted as the pipeline flow does: (config, run, metrics, decision).
    System metrics sampled every second, so the short run has some (the default 5 s can outlast it)."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    sources = [
        {"name": name, "path": str(write_jsonl(f"{name}.jsonl", qa_rows(40, [pair])))}
        for name, pair in zip(("math", "chat"), QA)
    ]
    evaluate = {"num_generations": 4, "max_new_tokens": 6, "bootstrap_resamples": 200, "suites": []}
    cfg = formatted(write_project(tiny_model, sources, train=TRAIN, evaluate=evaluate))
    run = run_train(cfg)
    metrics = run_evaluate(cfg).metrics
    record = asdict(run)
    registry.record_version(record, {registry.VERSIONED: "true", registry.VERSIONED_REASON: "recorded by the test"})
    decision = registry.promote(record, metrics, cfg.evaluate.primary_metric, cfg.evaluate.promotion_margin)
    return cfg, run, metrics, decision


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_pages_a_reviewer_lands_on_show_what_was_measured_link_in_order_and_the_base_answers_too(
    reviewed, tiny_model, tmp_path, capsys
):
    """One pipeline for all the pages (a training run is most of this test's minute)."""
    cfg, run, metrics, decision = reviewed
    client = MlflowClient(run.tracking_uri)
    training = client.get_run(run.run_id)
    experiment = client.get_experiment(run.experiment_id)
    assert experiment.tags[pages.EXPERIMENT_KIND_TAG] == pages.MODEL_TRAINING

    # The run's val_nll (its latest value) is the last point of the curve: the weights exported, after training.
    curve = read_rows(Path("models/val_curve.csv"))
    assert int(curve[-1]["step"]) == run.steps and len(curve) > 2
    assert training.data.metrics["val_nll"] == pytest.approx(float(curve[-1]["val_nll"]))
    assert training.data.metrics["val_nll"] == pytest.approx(run.val_nll_after)
    assert run.val_nll_after != pytest.approx(run.val_nll_before)

    # The logged model: named after the registered model and the run; its one training metric is val_nll after
    # training; no system metric and no constant is linked to it (the run keeps its system metrics).
    version = client.get_model_version("tiny", run.version)
    model = client.get_logged_model(evaluations.model_id(client, "tiny", run.version))
    assert model.name == logged_model_name("tiny", run.run_id) == f"tiny-{run.run_id[:8]}"
    from_training = {m.key: m.value for m in model.metrics if m.run_id == run.run_id}
    assert from_training == {"val_nll": pytest.approx(float(curve[-1]["val_nll"]))}
    assert any(key.startswith("system/") for key in training.data.metrics)
    assert not any(m.key.startswith("system/") for m in model.metrics)

    # Constants are params: of the run and of the logged model; the launch settings of a local run: its target.
    loaded, _ = load_finetuned(Path("models/model"))
    total = sum(p.numel() for p in loaded.parameters())
    trainable = sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n)
    for params in (training.data.params, model.params):
        assert params["total_params"] == str(total) and params["trainable_params"] == str(trainable)
        assert params["train_examples"] == str(len(read_rows_parquet(Path("data/curated/train.parquet"))))
    assert not {"total_params", "trainable_params", "train_examples"} & set(training.data.metrics)
    assert [k for k in training.data.params if k.startswith("launch.")] == ["launch.target"]
    assert training.data.params["launch.target"] == "local"

    # The evaluation run: constants as params, base and tuned of each metric side by side in one table.
    [evaluated] = evaluation_runs(client, run.run_id)
    eval_metrics, eval_params = evaluated.data.metrics, evaluated.data.params
    for constant in ("test_rows", "test_generations", "test_confidence", "test_source/math/rows"):
        assert constant not in eval_metrics, constant
    assert "test_test_rows" not in eval_metrics and "test_test_rows" not in eval_params
    assert eval_params["test_rows"] == str(metrics["test_rows"])
    assert eval_params["test_generations"] == str(metrics["generations"]) == "4"
    assert eval_params["test_source/math/rows"] == str(metrics["per_source"]["math"]["rows"])
    assert eval_metrics["test_tuned_nll"] == pytest.approx(metrics["tuned"]["nll"])  # measured: still a metric
    table = json.loads(
        Path(client.download_artifacts(evaluated.info.run_id, evaluations.COMPARISON_TABLE, str(tmp_path))).read_text()
    )
    rows = {(r[0], r[1]): dict(zip(table["columns"], r)) for r in table["data"]}
    for key in ("nll", "perplexity", "chrf", "rouge_l", "exact_match"):
        row = rows[("test", key)]
        assert row["base"] == pytest.approx(metrics["base"][key])
        assert row["tuned"] == pytest.approx(metrics["tuned"][key])
        assert row["tuned - base"] == pytest.approx(metrics["tuned"][key] - metrics["base"][key])
    assert rows[("test", "degenerate_rate")]["tuned"] == metrics["behaviour"]["degenerate_rate_tuned"]

    # The version's description links the report and the pages in order, as Markdown links the UI opens.
    description = version.description
    eval_id, model_id = evaluated.info.run_id, model.model_id
    report = f"get-artifact?path=eval/report.html&run_uuid={eval_id}"
    assert f"**Report**: [eval/report.html]({report})" in description
    order = [
        f"[report]({report})",
        f"[evaluation run](#/experiments/{run.experiment_id}/runs/{eval_id}?{pages.TRAINING_VIEW})",
        f"[logged model](#/experiments/{run.experiment_id}/models/{model_id}?{pages.TRAINING_VIEW})",
        f"[training run](#/experiments/{run.experiment_id}/runs/{run.run_id}?{pages.TRAINING_VIEW})",
    ]
    assert "**Review, in order**: " + " → ".join(order) in description
    assert f"runs:/{eval_id}/eval/report.html" in description  # and the URI Python reads it by

    # The report a reviewer opens from the version shows the decision; the local file (a DVC output) the preview.
    logged = Path(client.download_artifacts(eval_id, evaluations.REPORT_ARTIFACT, str(tmp_path / "r"))).read_text()
    shown = re.search(r"Registry: <b>([^<]*)</b> — ([^<]*)</p>", logged)
    assert shown and shown.group(1) == decision.alias == "champion" and "preview" not in logged
    assert shown.group(2) == html.escape(decision.reason)
    assert "champion (preview)" in Path("reports/report.html").read_text()

    # `sftops generate --base` answers with the base model, as transformers does; without it, the tuned model.
    generated_by_base_and_tuned(run, tiny_model, capsys)


def read_rows_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def transformers_answer(base: Path, tokenizer_dir: Path, question: str, max_new_tokens: int) -> str:
    """The base model's greedy answer with transformers alone: the tuned model's chat template, EOS to stop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def generated_by_base_and_tuned(run, tiny_model: Path, capsys) -> None:
    question = QA[0][0]
    expected = transformers_answer(tiny_model, Path("models/model"), question, 6)
    answers = {}
    for model in ("models/model", f"runs:/{run.run_id}/{logged_model_name('tiny', run.run_id)}", run.run_id):
        for base in (False, True):
            capsys.readouterr()
            args = ["generate", "--model", model, "--prompt", question, "--max-new-tokens", "6"]
            if base and model != "models/model":
                continue  # a model logged from a local base holds merged weights: its base is not in the registry
            assert main([*args, *(["--base"] if base else [])]) == 0
            answers[model, base] = capsys.readouterr().out.split("\n", 1)[1].strip()
    assert answers["models/model", True] == expected
    assert answers["models/model", False] != expected  # the tuned model answers otherwise
    assert len({answer for (_, base), answer in answers.items() if not base}) == 1  # every address, one model


def test_each_launch_setting_is_logged_only_for_the_targets_it_applies_to():
    from sftops.config import LAUNCH_SETTINGS, LaunchConfig

    assert set(LAUNCH_SETTINGS) == set(LaunchConfig.model_fields)  # a new setting says where it applies
    assert LaunchConfig().applied() == {"target"}
    slurm, kubernetes = LaunchConfig(target="slurm").applied(), LaunchConfig(target="kubernetes").applied()
    assert "time_limit_minutes" in slurm and "image" not in slurm and "cpus_per_node" in slurm
    assert "image" in kubernetes and "volume_claim" in kubernetes and "time_limit_minutes" not in kubernetes
    assert LaunchConfig(target="loopback").applied() == {"target", "name", "nodes", "rdzv_port", "join_timeout_s"}
    # a node of a launched job reads target: local with the job's nodes (launch.write_params): all of them applied
    assert LaunchConfig(nodes=2).applied() == set(LAUNCH_SETTINGS)


def test_every_figure_is_either_a_metric_or_a_param_and_counts_are_params():
    metrics = {
        "test_rows": 25, "generations": 4, "confidence": 0.95, "win_rate": 0.5, "nll_improvement": 0.1,
        "base": {"nll": 2.0}, "tuned": {"nll": 1.9},
        "per_source": {"qa": {"rows": 25, "win_rate": 0.5}},
        "behaviour": {"answers": 4, "length_ratio": 0.9, "min_length_ratio": 0.5, "broken": []},
    }  # fmt: skip
    figures, constants = evaluations.split_figures(metrics)
    assert figures == {
        "test_base_nll": 2.0, "test_tuned_nll": 1.9, "test_win_rate": 0.5, "test_nll_improvement": 0.1,
        "test_source/qa/win_rate": 0.5, "test_length_ratio": 0.9,
    }  # fmt: skip
    assert constants == {
        "test_rows": "25", "test_generations": "4", "test_confidence": "0.95", "test_source/qa/rows": "25",
        "test_answers": "4", "test_min_length_ratio": "0.5",
    }  # fmt: skip
