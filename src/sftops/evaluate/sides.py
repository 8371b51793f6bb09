"""The two sides of a review, on the same rows: the tuned model, and its base, switched on only when its results
are not cached. Each side's result is its response NLL per row, its answers to the sampled prompts, and each
answer scored against its references."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sftops import faults
from sftops.config import Config, EvaluateConfig, ModelConfig
from sftops.data.store import TokenRows
from sftops.encoded import IGNORE, Encoded
from sftops.errors import GpuMemoryError
from sftops.evaluate import base_cache
from sftops.evaluate.behaviour import compare_behaviour
from sftops.evaluate.generation import Completion, answer, complete, decoding_of
from sftops.evaluate.scoring import row_scores, summarise
from sftops.modeling import is_adapter, load_base_model, load_finetuned, read_manifest
from sftops.train.loss import score_rows


@dataclass(frozen=True)
class EvalSet:
    """Rows as a review uses them: all of them scored (examples, from `rows`), a sample answered (`prompts`,
    rendered from `sample`, each with every reference answer in `refs`; its first reference as much of it as an
    answer can hold in `reachable`)."""

    name: str  # "test split", "suite NAME": what progress bars and errors call it
    examples: Sequence[Encoded]
    rows: list[dict[str, Any]]
    sample: list[dict[str, Any]]
    refs: list[list[str]]
    prompts: list[str]
    reachable: list[str]  # per prompt: its first reference cut to evaluate.max_new_tokens tokens (behaviour.py)


@dataclass(frozen=True)
class Side:
    """One model's results on an EvalSet."""

    scores: list[tuple[float, int]]  # per row: (response NLL sum, response tokens)
    completions: list[Completion]  # per sampled prompt
    generated: dict[str, list[float]]  # per sampled prompt: exact_match, rouge_l, chrf against its references
    cached: bool = False  # read from the base model's cache, not computed

    def summary(self) -> dict[str, float]:
        return summarise(self.scores, self.generated, self.completions)

    def row_nll(self) -> list[float]:
        return [s / max(c, 1) for s, c in self.scores]

    def texts(self) -> list[str]:
        return [c.text for c in self.completions]


class BaseSwitch:
    """The base model, switched on only when a result is not in the cache: the tuned model with its adapter
    disabled (the same weights), or the base loaded once from the manifest for a full fine-tune."""

    def __init__(self, manifest: dict[str, Any], tuned: torch.nn.Module, dev: torch.device) -> None:
        self.manifest, self.tuned, self.dev, self._loaded = manifest, tuned, dev, None

    @contextlib.contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        if is_adapter(self.manifest):
            with self.tuned.disable_adapter():
                yield self.tuned
            return
        if self._loaded is None:
            self._loaded = load_base_model(ModelConfig.model_validate(self.manifest["base"])).to(self.dev)
            self._loaded.eval()
        yield self._loaded


def answer_with(model_dir: Path, questions: Sequence[str], max_new_tokens: int, base: bool = False) -> list[str]:
    """Answers from the model saved in `model_dir` (sftops generate), or with `base` from the base model it was
    fine-tuned from, switched to as the evaluate stage switches (BaseSwitch), with the same tokenizer and template."""
    model, tokenizer = load_finetuned(model_dir)
    if not base:
        return answer(model, tokenizer, questions, max_new_tokens)
    with BaseSwitch(read_manifest(model_dir), model, next(model.parameters()).device).active() as base_model:
        return answer(base_model, tokenizer, questions, max_new_tokens)


def run_side(model, tokenizer, data: EvalSet, cfg: Config, dev: torch.device, who: str) -> Side:
    """Score every row and answer every sampled prompt with `model`; a GPU that runs out of memory stops the stage
    with the settings to change."""
    e = cfg.evaluate
    try:
        faults.out_of_memory(f"evaluate:{who}")
        scores = score_rows(
            model, data.examples, e.batch_size, tokenizer.pad_token_id, dev, desc=f"score {who} on {data.name}"
        )
        completions = complete(
            model, tokenizer, data.prompts, decoding_of(e), e.batch_size, desc=f"generate {who} on {data.name}"
        )
    except torch.OutOfMemoryError:
        smaller = f"evaluate.batch_size={e.batch_size // 2}, or " if e.batch_size > 1 else ""
        raise GpuMemoryError(
            f"evaluating the {who} model ran out of GPU memory. Try {smaller}a smaller "
            f"evaluate.max_new_tokens (now {e.max_new_tokens}) or model.max_length"
        ) from None
    return Side(scores, completions, row_scores([c.text for c in completions], data.refs, e.answer_extraction))


def base_side(base: BaseSwitch, tokenizer, data: EvalSet, cfg: Config, dev: torch.device, key: str) -> Side:
    """The base model's side, from the cache under `key` (base_cache.cache_key) when it is there."""
    cached = base_cache.load(key)
    # The key covers the data and settings; checking the token counts as well costs nothing.
    expected = (
        data.examples.target_counts().tolist()
        if isinstance(data.examples, TokenRows)  # from the arrays, not per token
        else [sum(label != IGNORE for label in e.labels[1:]) for e in data.examples]
    )
    if cached is not None and [c for _, c in cached["scores"]] == expected:
        completions = [Completion(**c) for c in cached["completions"]]
        generated = row_scores([c.text for c in completions], data.refs, cfg.evaluate.answer_extraction)
        return Side([tuple(s) for s in cached["scores"]], completions, generated, cached=True)
    with base.active() as model:
        side = run_side(model, tokenizer, data, cfg, dev, "base")
    base_cache.store(key, {"scores": side.scores, "completions": [asdict(c) for c in side.completions]})
    return side


def behaviour_of(e: EvaluateConfig, data: EvalSet, base: Side, tuned: Side) -> dict[str, Any]:
    """How the answers to the sampled prompts changed, base against tuned (behaviour.compare_behaviour), with the
    bootstrap settings of the evaluation."""
    return compare_behaviour(
        base.completions,
        tuned.completions,
        data.reachable,
        (base.generated, tuned.generated),
        e.bootstrap_resamples,
        e.bootstrap_seed,
        e.confidence,
    )
