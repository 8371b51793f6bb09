"""The gate checks the served artifact: after training registers a version, the evaluate stage loads it as
`mlflow models serve` does (mlflow.pyfunc.load_model of the registry URI, in a fresh process) and runs it on a
seeded sample of test rows. A faithful version passes (the same greedy answers, NLL within the tolerance, the
stops honoured) and says so on the version; one whose logged weights were changed after evaluation-equivalent
training (a merge gone wrong) fails, and the gate refuses it naming the row and both answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file

from conftest import trained_qa
from sftops.evaluate.parity import PARITY_BLOCK
from sftops.evaluate.promotion import CHALLENGER, CHAMPION
from sftops.stages.evaluate import run_evaluate
from sftops.tracking import registry
from sftops.tracking.parity import PARITY_TAG


@pytest.fixture
def trained(project_folder, tiny_model):
    return trained_qa(
        tiny_model,
        evaluate={"num_generations": 2, "max_new_tokens": 8, "parity_rows": 4, "test_min_length_ratio": None},
    )


def versioned(cfg) -> dict:
    """The run's record (run.json), its version tagged as the flow's record step tags it: the gate then decides
    on the evaluation alone."""
    record = json.loads((Path(cfg.paths.model) / "run.json").read_text())
    registry.record_version(record, {registry.VERSIONED: "true", registry.VERSIONED_REASON: "recorded by the test"})
    return record


def logged_weights(tracking: str, model_uri: str) -> Path:
    """The logged model's merged weights, where the (local) artifact store keeps them."""
    location = MlflowClient(tracking).get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    return Path(location.removeprefix("file://")) / "model" / "model.safetensors"


def test_a_faithful_version_passes_parity_and_says_so(trained):
    cfg, report = trained
    metrics = run_evaluate(cfg).metrics
    block = metrics[PARITY_BLOCK]
    assert block["checked"] and block["passed"], block
    assert block["rows"] == 4 and block["answers_equal"] == 4 and block["stops_honoured"] == 4
    assert block["max_nll_gap"] <= cfg.evaluate.parity_nll_tolerance
    assert block["model_uri"] == f"models:/tiny/{report.version}"
    tag = MlflowClient(report.tracking_uri).get_model_version("tiny", report.version).tags[PARITY_TAG]
    assert tag.startswith("passed: 4/4 greedy answers equal"), tag
    decision = registry.promote(versioned(cfg), metrics, "nll", 0.0)
    assert decision.alias == CHAMPION, decision.reason


def test_a_served_model_whose_weights_differ_is_refused_with_the_row_and_both_answers(trained):
    cfg, report = trained
    weights = logged_weights(report.tracking_uri, report.model_uri)
    tensors = load_file(weights)
    torch.manual_seed(0)
    head = "lm_head.weight"
    tensors[head] = tensors[head] + 0.5 * torch.randn_like(tensors[head])  # a merge that changed the weights
    save_file(tensors, weights, metadata={"format": "pt"})

    metrics = run_evaluate(cfg).metrics
    block = metrics[PARITY_BLOCK]
    assert block["checked"] and not block["passed"], block
    assert block["max_nll_gap"] > cfg.evaluate.parity_nll_tolerance
    difference = block["first_difference"]
    decision = registry.promote(versioned(cfg), metrics, "nll", 0.0)
    assert decision.alias == CHALLENGER
    assert decision.reason.startswith("the served model differs from the evaluated one: serving parity failed")
    assert f"test row {difference['row']}: evaluated {difference['evaluated']['text']!r}" in decision.reason
    assert f"served {difference['served']['text']!r}" in decision.reason
    tags = MlflowClient(report.tracking_uri).get_model_version("tiny", report.version).tags
    assert tags[PARITY_TAG].startswith("failed: ") and tags["promotion.decision"] == CHALLENGER
