"""The test split as a review uses it: every kept row scored, a sample of distinct prompts answered, each with
every reference the split has for its prompt."""

from __future__ import annotations

from typing import Any

from sftops.chat import generation_prompt
from sftops.config import Config
from sftops.data.examples import training_examples
from sftops.data.store import load_split
from sftops.errors import DataError
from sftops.evaluate.behaviour import within_tokens
from sftops.evaluate.scoring import generation_sample
from sftops.evaluate.sides import EvalSet


def read_test_split(cfg: Config, tokenizer) -> EvalSet:
    rows = load_split(cfg, "test")
    examples, kept, counts = training_examples(cfg, tokenizer, "test", rows)
    if not examples:
        raise DataError(f"no test rows to evaluate on ({counts}); raise data.test_fraction or model.max_length")
    kept_rows = [rows[i] for i in kept]
    sample, refs = generation_sample(kept_rows, cfg.evaluate.num_generations)
    prompts = [generation_prompt(tokenizer, r["messages"]) for r in sample]
    reachable = [within_tokens(tokenizer, r[0], cfg.evaluate.max_new_tokens) for r in refs]
    return EvalSet("test split", examples, kept_rows, sample, refs, prompts, reachable)


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """The last user turn, as the review's tables show the prompt."""
    return messages[-2]["content"] if len(messages) > 1 else ""
