"""The gate checks the served artifact: after training registers a version, the evaluate stage loads it as
`mlflow models serve` does (mlflow.pyfunc.load_model of the registry URI, in a fresh process) and runs it on a
seeded sample of test rows. A faithful version passes (the same greedy answers, NLL within the tolerance, the
stops honoured) and says so on the version; one whose logged weights were changed after evaluation-equivalent
training (a merge gone wrong) fails, and the gate refuses it naming the row and both answers."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file

from conftest import trained_qa
from sftops.chat import generation_prompt
from sftops.evaluate.generation import Decoding, complete
from sftops.evaluate.parity import PARITY_BLOCK
from sftops.evaluate.promotion import CHALLENGER, CHAMPION
from sftops.modeling import load_finetuned
from sftops.stages.evaluate import run_evaluate
from sftops.tracking import registry
from sftops.tracking.models import local_model_dir
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


def ending_at_once(weights: Path, eos: int) -> None:
    """The logged weights changed into a model whose every answer is its end-of-turn token: every token embedded
    alike (so every position's last hidden state is the same vector h, whatever the prompt), and the EOS row of
    the output matrix along h, far longer than the others."""
    from transformers import AutoModelForCausalLM

    tensors = load_file(weights)
    embed = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = embed[:1].expand_as(embed).contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(weights.parent, dtype=torch.float32)
    with torch.no_grad():
        h = model.model(torch.tensor([[0, 1, 2]])).last_hidden_state[0, -1]
    tensors["lm_head.weight"][eos] = 1000 * h / h.norm()
    save_file(tensors, weights, metadata={"format": "pt"})


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


def test_an_answer_ending_on_its_last_allowed_token_is_said_stopped(trained):
    """MLflow calls an answer of max_tokens tokens cut ("length") even where its last token is the end of turn;
    the served model says "stop" there, as the evaluated generation does (an independent count: the stop token
    among the tokens generated), on a model whose answers end on their first token."""
    cfg, report = trained
    uri = f"models:/tiny/{report.version}"
    weights = logged_weights(report.tracking_uri, report.model_uri)
    ending_at_once(weights, json.loads((weights.parent / "config.json").read_text())["eos_token_id"])
    messages = [{"role": "user", "content": "what is two plus two?"}]
    model, tokenizer = load_finetuned(local_model_dir(uri, report.tracking_uri))  # as sftops generate loads it
    prompt = generation_prompt(tokenizer, [*messages, {"role": "assistant", "content": ""}])
    [evaluated] = complete(model, tokenizer, [prompt], Decoding(max_new_tokens=1), 1)
    assert evaluated.stopped and evaluated.new_tokens == 1 and evaluated.text == ""
    served = mlflow.pyfunc.load_model(uri)
    [reply] = served.predict({"messages": messages, "max_tokens": 1})
    assert reply["usage"]["completion_tokens"] == 1  # MLflow's own rule would say "length"
    assert reply["choices"][0]["finish_reason"] == "stop", reply
    assert reply["choices"][0]["message"]["content"] == ""


def test_stories260k_whose_tokenizer_adds_bos_is_served_as_evaluated(project_folder, stories_model):
    """stories260K's tokenizer adds BOS to what it encodes, and its chat template writes BOS already: the served
    model encodes the rendered prompt as evaluate does (a second BOS changed greedy answers and MLflow's count of
    new tokens, so where answers stop): parity passes, and the served answer counts the tokens the evaluated
    generation made."""
    evaluate = {"num_generations": 2, "max_new_tokens": 12, "parity_rows": 6, "test_min_length_ratio": None}
    cfg, report = trained_qa(stories_model, evaluate=evaluate)
    block = run_evaluate(cfg).metrics[PARITY_BLOCK]
    assert block["checked"] and block["passed"], block
    assert block["rows"] == block["answers_equal"] == block["stops_honoured"] == 6
    assert block["max_nll_gap"] <= cfg.evaluate.parity_nll_tolerance

    uri = f"models:/tiny/{report.version}"
    messages = [{"role": "user", "content": "what is two plus two?"}]
    model, tokenizer = load_finetuned(Path(cfg.paths.model) / "model")
    prompt = generation_prompt(tokenizer, [*messages, {"role": "assistant", "content": ""}])
    assert tokenizer(prompt)["input_ids"][:2] == [tokenizer.bos_token_id] * 2  # what the pipeline encoded before
    [evaluated] = complete(model, tokenizer, [prompt], Decoding(max_new_tokens=12), 1)
    [reply] = mlflow.pyfunc.load_model(uri).predict({"messages": messages, "max_tokens": 12})
    assert reply["usage"]["completion_tokens"] == evaluated.new_tokens
    assert reply["choices"][0]["message"]["content"].strip() == evaluated.text
