"""Regression suites: named evaluation sets besides the test split, read and mapped the way sources are (same
readers, schemas, field mappings and validation), checked against the train split (rows that duplicate a train
row are excluded and counted; prompts overlapping train prompts beyond data.contamination_threshold are
reported), and sampled for generation with a seed. Scoring is evaluate/suite_scores.py."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from sftops.config import DataConfig, EvaluateConfig, SuiteConfig
from sftops.data.chunks import conversation_text, row_id
from sftops.data.curate import prompt_key
from sftops.data.schemas import RowError, to_conversation
from sftops.data.sources import read_source
from sftops.data.split import contamination, prompt_text
from sftops.errors import DataError
from sftops.provenance.fingerprints import json_sha256

Row = dict[str, Any]

# The answer a drift suite's row is read with, so that it is validated as any conversation is; replaced by the base
# model's answer before anything scores it.
PENDING_ANSWER = "(the base model's answer, generated at evaluation)"


def with_pending_answer(fields: dict[str, Any]) -> dict[str, Any]:
    """A drift suite's raw row (a `prompt`, or `messages` ending with a user turn) completed with the pending
    answer, in the shape its schema reads."""
    if isinstance(fields.get("messages"), list):
        return {**fields, "messages": [*fields["messages"], {"role": "assistant", "content": PENDING_ANSWER}]}
    return {**fields, "completion": PENDING_ANSWER}


@dataclass
class SuiteRows:
    """A suite's rows after mapping, validation and the train-split checks, with what left and why."""

    name: str
    rows: list[Row]
    counts: dict[str, int]
    contaminated: list[dict[str, Any]] = field(default_factory=list)  # {"origin", "overlap"} per flagged prompt

    @property
    def sha256(self) -> str:
        """Identity of the suite's rows as evaluated (what the base model's cached results depend on)."""
        return json_sha256([[r["id"], r["messages"]] for r in self.rows])


def read_suite(suite: SuiteConfig, max_row_bytes: int) -> tuple[list[Row], dict[str, int]]:
    """The suite's rows as canonical conversations; unreadable and invalid rows counted by kind."""
    rows: list[Row] = []
    counts = {"read": 0, "rejected": 0}
    try:
        records = tqdm(read_source(suite, max_row_bytes), desc=f"read suite {suite.name}", unit=" rows", leave=False)
        for rec in records:
            counts["read"] += 1
            try:
                if rec.error is not None:
                    raise RowError("unreadable", rec.error)
                fields = rec.fields or {}
                if suite.reference == "base":  # prompts only: the base model answers them at evaluation
                    fields = with_pending_answer(fields)
                conv = to_conversation(fields, suite.row_schema, suite.fields)
            except RowError:
                counts["rejected"] += 1
                continue
            rows.append(
                {"id": row_id(conv["messages"], conv["tools"]), "source": suite.name, "origin": rec.origin, **conv}
            )
    except DataError as exc:  # a missing file, an unreadable whole file: one line naming the suite
        detail = str(exc).removeprefix(f"source {suite.name!r}: ")
        raise DataError(f"evaluate.suites {suite.name!r}: {detail}") from None
    return rows, counts


def _seeded_rank(seed: int, rid: str) -> bytes:
    return hashlib.sha256(f"suite\0{seed}\0{rid}".encode()).digest()


def check_against_train(
    rows: list[Row], train_rows: list[Row], d: DataConfig
) -> tuple[list[Row], int, list[dict[str, Any]]]:
    """(rows kept, rows dropped as duplicates of a train row, prompts flagged as overlapping the train split's).
    A duplicate is the same normalised conversation, as the format stage's exact deduplication defines it."""
    train_texts = {conversation_text(r["messages"]) for r in train_rows}
    kept = [r for r in rows if conversation_text(r["messages"]) not in train_texts]
    train_prompts = [prompt_text(r["messages"]) for r in train_rows]
    flagged = contamination(
        train_prompts, [prompt_text(r["messages"]) for r in kept], d.contamination_ngram, d.contamination_threshold
    )
    return kept, len(rows) - len(kept), [{"origin": kept[i]["origin"], "overlap": round(o, 4)} for i, o in flagged]


def prepare_suite(suite: SuiteConfig, train_rows: list[Row], d: DataConfig, seed: int) -> SuiteRows:
    """Read, validate, drop within-suite duplicates and train duplicates, report contamination, cap at
    max_rows (a seeded sample by row id). Stops with one line naming the suite when no row is left."""
    rows, counts = read_suite(suite, d.max_row_bytes)
    unique = list({r["id"]: r for r in reversed(rows)}.values())[::-1]  # the first copy of each row
    counts["duplicates"] = len(rows) - len(unique)
    kept, counts["train_duplicates"], flagged = check_against_train(unique, train_rows, d)
    counts["sampled_out"] = 0
    if suite.max_rows is not None and len(kept) > suite.max_rows:
        chosen = {r["id"] for r in sorted(kept, key=lambda r: _seeded_rank(seed, r["id"]))[: suite.max_rows]}
        counts["sampled_out"] = len(kept) - len(chosen)
        kept = [r for r in kept if r["id"] in chosen]
        flagged = [f for f in flagged if any(r["origin"] == f["origin"] for r in kept)]
    counts["kept"] = len(kept)
    if not kept:
        raise DataError(
            f"evaluate.suites {suite.name!r}: no rows left to evaluate on ({counts}); check its path, "
            f"schema and fields (the rows must map to conversations ending with an assistant answer)"
        )
    return SuiteRows(suite.name, kept, counts, flagged)


def generation_sample(rows: list[Row], n: int, seed: int) -> tuple[list[Row], list[list[str]]]:
    """Up to n rows with distinct prompts, a seeded sample stable when rows are added, each with every reference
    answer the suite has for its prompt."""
    refs: dict[str, list[str]] = {}
    first: dict[str, Row] = {}
    for row in sorted(rows, key=lambda r: _seeded_rank(seed, r["id"])):
        key = prompt_key(row["messages"])
        refs.setdefault(key, []).append(row["messages"][-1]["content"])
        first.setdefault(key, row)
    keys = list(first)[:n]
    return [first[k] for k in keys], [refs[k] for k in keys]


def suite_metric(suite: SuiteConfig, primary_metric: str) -> str:
    return suite.primary_metric or primary_metric


def suite_margin(suite: SuiteConfig, regression_margin: float) -> float:
    return suite.regression_margin if suite.regression_margin is not None else regression_margin


def suite_budget(suite: SuiteConfig, e: EvaluateConfig) -> tuple[float | None, float | None]:
    """The suite's behaviour budget: (floor on the length ratio tuned / base, ceiling on the rise of degenerate
    answers), each its own or else evaluate's."""
    floor = suite.min_length_ratio if suite.min_length_ratio is not None else e.min_length_ratio
    ceiling = suite.max_degenerate_rise if suite.max_degenerate_rise is not None else e.max_degenerate_rise
    return floor, ceiling
