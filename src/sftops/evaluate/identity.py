"""What an evaluation's result was measured on: the test split as an MLflow dataset (name and digest) and, per
metric family, the settings the metric depends on. Two results compare like for like when their family's keys
match; the base model's cache is keyed by the settings its results depend on."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from sftops.config import Config
from sftops.evaluate.generation import decoding_of
from sftops.evaluate.promotion import GENERATION_FAMILY, NLL_FAMILY
from sftops.provenance.fingerprints import file_sha256, json_sha256, tokenizer_sha256

TEST_DATASET = "test"


def base_eval_params(cfg: Config) -> dict[str, Any]:
    """The settings the base model's scores and outputs depend on (not the scoring rules or statistics)."""
    e = cfg.evaluate
    return {
        "max_length": cfg.model.max_length,
        "batch_size": e.batch_size,
        "num_generations": e.num_generations,
        **asdict(decoding_of(e)),
    }


def comparable_settings(cfg: Config, tokenizer_sha: str) -> dict[str, dict[str, Any]]:
    """Per metric family, the settings its value depends on besides the test data: NLL on the tokenizer and
    chat template and how rows are fitted to max_length; generation metrics also on what is generated and how
    it is scored. The batch size is there for generations only: left padding can move a greedy token, while
    NLL is per-row (padding is masked)."""
    e = cfg.evaluate
    nll = {"tokenizer_sha256": tokenizer_sha, "max_length": cfg.model.max_length, "overflow": cfg.data.overflow}
    generation = {
        **nll,
        "num_generations": e.num_generations,
        "answer_extraction": e.answer_extraction,
        "batch_size": e.batch_size,
        **asdict(decoding_of(e)),
    }
    return {NLL_FAMILY: nll, GENERATION_FAMILY: generation}


def evaluation_identity(cfg: Config, test_file: Path, tokenizer) -> dict[str, Any]:
    """The test split as an MLflow dataset (name, digest: the file's sha256, 32 characters as MLflow keeps them)
    and per metric family the settings and a key over both."""
    digest = file_sha256(test_file)[:32]
    settings = comparable_settings(cfg, tokenizer_sha256(tokenizer))
    keys = {family: json_sha256({"dataset": digest, **values}) for family, values in settings.items()}
    return {"dataset": {"name": TEST_DATASET, "digest": digest}, "settings": settings, "keys": keys}
