"""Training examples for a split: from the tokenised cache the format stage wrote when its key matches the
current data, tokenizer, template, max_length and overflow policy; otherwise tokenised afresh, the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from sftops.chat import Encoded
from sftops.config import Config
from sftops.data.store import cache_key, read_cache
from sftops.data.tokenize import Renderer, encode_batch, fit


def training_examples(
    cfg: Config, tokenizer: PreTrainedTokenizerBase, split: str, rows: list[dict[str, Any]]
) -> tuple[list[Encoded], list[int], dict[str, Any]]:
    """(examples, indices of the rows they came from, counts), as sftops.chat.encode_rows returns, with
    data.overflow applied and rows left with no target token dropped and counted."""
    curated = Path(cfg.paths.curated)
    key = cache_key(curated, tokenizer, cfg.model.max_length, cfg.data.overflow)
    cached = read_cache(curated, split, key)
    counts: dict[str, Any] = {"rows": len(rows), "kept": 0, "dropped_too_long": 0, "dropped_no_target": 0,
                              "truncated": 0, "response_tokens_lost": 0, "from_cache": False}
    examples, kept = [], []
    position = {rid: i for i, rid in enumerate(cached.ids.to_pylist())} if cached is not None else {}
    if cached is not None and all(r["id"] in position for r in rows):
        counts["from_cache"] = True
        for i, row in enumerate(rows):
            at = position[row["id"]]
            examples.append(cached.row(at))
            kept.append(i)
            counts["truncated"] += int(cached.truncated[at])
            counts["response_tokens_lost"] += int(cached.lost[at])
    else:
        render = Renderer(tokenizer)
        convs = [{"messages": r["messages"], "tools": r.get("tools")} for r in rows]
        for i, (row, conv, enc) in enumerate(zip(rows, convs, encode_batch(tokenizer, convs, render))):
            fitted = fit(tokenizer, render, conv, enc, cfg.model.max_length, cfg.data.overflow, row.get("origin", f"row {i}"))
            if fitted.encoded is None:
                counts["dropped_too_long" if fitted.kind == "too long" else "dropped_no_target"] += 1
                continue
            examples.append(fitted.encoded)
            kept.append(i)
            counts["truncated"] += int(fitted.truncated)
            counts["response_tokens_lost"] += fitted.response_tokens_lost
    counts["kept"] = len(examples)
    return examples, kept, counts
