"""Training examples for a split: from the tokenised cache the format stage wrote when its key matches the
current data, tokenizer, template, max_length and overflow policy (memory-mapped arrays, no per-token Python
objects); otherwise tokenised afresh, the same way (lists: small data, tests, evaluation suites)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from sftops.config import Config
from sftops.data.store import TokenRows, cache_key, read_cache, read_columns, read_split
from sftops.data.tokenize import Renderer, encode_batch, fit
from sftops.encoded import Encoded


def _counts(rows: int) -> dict[str, Any]:
    return {
        "rows": rows,
        "kept": 0,
        "dropped_too_long": 0,
        "dropped_no_target": 0,
        "truncated": 0,
        "response_tokens_lost": 0,
        "from_cache": False,
    }


def split_cache(cfg: Config, tokenizer: PreTrainedTokenizerBase, split: str) -> TokenRows | None:
    """The split's whole cache, when its key matches the current data, tokenizer, template, max_length, overflow."""
    curated = Path(cfg.paths.curated)
    return read_cache(curated, split, cache_key(curated, tokenizer, cfg.model.max_length, cfg.data.overflow))


def cached_rows(
    cfg: Config, tokenizer: PreTrainedTokenizerBase, split: str, row_ids: pa.ChunkedArray
) -> TokenRows | None:
    """The cached encodings of `row_ids`, in that order, or None when the cache is stale or lacks one of them."""
    cached = split_cache(cfg, tokenizer, split)
    if cached is None:
        return None
    if cached.ids.equals(row_ids):  # the usual case: the split as the format stage wrote it
        return cached
    at = pc.index_in(row_ids, value_set=cached.ids.combine_chunks())
    return None if at.null_count else cached.select(at.to_numpy(zero_copy_only=False))


def cache_counts(rows: TokenRows) -> dict[str, Any]:
    return {
        **_counts(len(rows)),
        "kept": len(rows),
        "truncated": int(rows.truncated.sum()),
        "response_tokens_lost": int(rows.lost.sum()),
        "from_cache": True,
    }


def training_examples(
    cfg: Config, tokenizer: PreTrainedTokenizerBase, split: str, rows: list[dict[str, Any]]
) -> tuple[Sequence[Encoded], list[int], dict[str, Any]]:
    """(examples, indices of the rows they came from, counts), as encode_curated_rows returns them, with
    data.overflow applied and rows left with no target token dropped and counted. From the cache, the examples
    are a TokenRows (array-backed, indexable like a list of Encoded)."""
    cached = cached_rows(cfg, tokenizer, split, pa.chunked_array([pa.array([r["id"] for r in rows], pa.string())]))
    if cached is not None:
        return cached, list(range(len(rows))), cache_counts(cached)
    return encode_curated_rows(tokenizer, rows, cfg.model.max_length, cfg.data.overflow)


def encode_curated_rows(
    tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], max_length: int, overflow: str = "drop"
) -> tuple[list[Encoded], list[int], dict[str, Any]]:
    """Tokenise curated rows as the format stage does (the path without a valid cache): the examples, the indices
    of the rows they came from, and counts. A row that does not fit max_length is handled by the overflow policy
    and one with no target token is dropped: neither may enter training as a silently truncated response or a
    zero loss. Both are counted."""
    counts = _counts(len(rows))
    examples, kept = [], []
    render = Renderer(tokenizer)
    convs = [{"messages": r["messages"], "tools": r.get("tools")} for r in rows]
    for i, (row, conv, enc) in enumerate(zip(rows, convs, encode_batch(tokenizer, convs, render))):
        fitted = fit(tokenizer, render, conv, enc, max_length, overflow, row.get("origin", f"row {i}"))
        if fitted.encoded is None:
            counts["dropped_too_long" if fitted.kind == "too long" else "dropped_no_target"] += 1
            continue
        examples.append(fitted.encoded)
        kept.append(i)
        counts["truncated"] += int(fitted.truncated)
        counts["response_tokens_lost"] += fitted.response_tokens_lost
    counts["kept"] = len(examples)
    return examples, kept, counts


@dataclass
class SplitExamples:
    """A split ready to train on: the examples, each one's index into source_names, and the encoding counts."""

    examples: Sequence[Encoded]
    sources: np.ndarray
    source_names: list[str]
    counts: dict[str, Any]


def sampled(n_rows: int, max_rows: int | None, seed: int) -> np.ndarray:
    """Row indices: all of them, or max_rows drawn as random.Random(seed).sample draws them from the rows."""
    if max_rows is None or n_rows <= max_rows:
        return np.arange(n_rows)
    return np.asarray(random.Random(seed).sample(range(n_rows), max_rows), dtype=np.int64)


def source_codes(sources: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Each row's index into the sorted source names."""
    filled = pc.fill_null(sources, "")
    names = sorted(pc.unique(filled).to_pylist())
    codes = pc.index_in(filled, value_set=pa.array(names, pa.string()))
    return codes.to_numpy().astype(np.int64), names


def split_examples(
    cfg: Config, tokenizer: PreTrainedTokenizerBase, split: str, max_rows: int | None = None, seed: int = 0
) -> SplitExamples:
    """The train stage's reader: with a valid cache only the source column of the curated split is read (neither
    the conversations nor the row ids: the cache's key holds the split files' hash, so its row i is the split's
    row i; decoding a million ids from Parquet costs hundreds of MB) and the tokens stay memory-mapped;
    otherwise the split is read and tokenised."""
    sources = read_columns(cfg.paths.curated, split, ["source"]).column("source")
    chosen = sampled(len(sources), max_rows, seed)
    cached = split_cache(cfg, tokenizer, split)
    if cached is not None and len(cached) == len(sources):
        if len(chosen) != len(sources):
            cached, sources = cached.select(chosen), sources.take(pa.array(chosen))
        codes, names = source_codes(sources)
        return SplitExamples(cached, codes, names, cache_counts(cached))
    rows = read_split(cfg.paths.curated, split)
    rows = [rows[i] for i in chosen.tolist()]
    examples, kept, counts = encode_curated_rows(tokenizer, rows, cfg.model.max_length, cfg.data.overflow)
    codes, names = source_codes(pa.chunked_array([pa.array([rows[i].get("source") for i in kept], pa.string())]))
    return SplitExamples(examples, codes, names, counts)
