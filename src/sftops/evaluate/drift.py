"""Drift suites (a suite with `reference: base`): prompts only, each answered first by the base model, greedily,
and that answer is the prompt's reference. Scored like any suite, they say how far fine-tuning moved the model from
how its base answered (the likelihood it still gives those answers, the length and health of its own), with no
reference answers for anyone to write or license."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from sftops.chat import generation_prompt
from sftops.config import Config, SuiteConfig
from sftops.evaluate import base_cache
from sftops.evaluate.generation import Decoding, complete
from sftops.evaluate.sides import BaseSwitch
from sftops.evaluate.suites import SuiteRows
from sftops.provenance.fingerprints import tokenizer_sha256


def base_answers(
    model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """The model's greedy answers to rendered prompts: the references of a drift suite when the model is the base."""
    completions = complete(model, tokenizer, prompts, Decoding(max_new_tokens), batch_size, desc="base answers")
    return [c.text for c in completions]


def prompts_of(tokenizer, prepared: SuiteRows) -> list[str]:
    return [generation_prompt(tokenizer, r["messages"]) for r in prepared.rows]


def answered(prepared: SuiteRows, answers: Sequence[str]) -> SuiteRows:
    """The suite's rows with the base model's answers as their final turns; a prompt the base left unanswered
    (nothing visible) has no reference and is left out, counted as `unanswered_by_base`."""
    if len(answers) != len(prepared.rows):
        raise ValueError(f"one answer per row needed ({len(answers)} answers, {len(prepared.rows)} rows)")
    rows = [
        {**row, "messages": [*row["messages"][:-1], {"role": "assistant", "content": answer}]}
        for row, answer in zip(prepared.rows, answers)
        if answer.strip()
    ]
    counts = {**prepared.counts, "unanswered_by_base": len(prepared.rows) - len(rows), "kept": len(rows)}
    return replace(prepared, rows=rows, counts=counts)


def with_base_references(
    cfg: Config, suite: SuiteConfig, prepared: SuiteRows, base: BaseSwitch, tokenizer, dev: torch.device
) -> SuiteRows:
    """A drift suite's rows answered by the base model (cached with its other results: a new fine-tune of the same
    base does not generate them again); any other suite as it is."""
    if suite.reference != "base":
        return prepared
    e = cfg.evaluate
    settings = {"drift_references": True, "max_new_tokens": e.max_new_tokens, "max_length": cfg.model.max_length}
    key = base_cache.cache_key(base.manifest["base"], prepared.sha256, tokenizer_sha256(tokenizer), settings, dev.type)
    cached = base_cache.load(key)
    if cached is not None and len(cached["answers"]) == len(prepared.rows):
        return answered(prepared, cached["answers"])
    with base.active() as model:
        answers = base_answers(model, tokenizer, prompts_of(tokenizer, prepared), e.max_new_tokens, e.batch_size)
    base_cache.store(key, {"answers": answers})
    return answered(prepared, answers)
