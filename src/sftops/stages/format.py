"""Stage 2, format: map raw rows to canonical conversations (rejecting, with a reason per row, what cannot be
trained on), remove exact and near duplicates, sample and weight the sources, split by a seeded hash of the
prompt, tokenise with the real tokenizer (length statistics, the max_length policy, the mask self-check),
and write the curated Parquet splits, the tokenised cache, the rejected rows, stats.json and the data card.
For every source: read = rejected at ingest + rejected here + duplicates + sampled out + dropped for length
or no target + kept.

Bounded memory at any size: pass 1 maps and tokenises the raw rows chunk by chunk in worker processes
(sftops.data.chunks), each chunk's rows and tokens going to files of its own; the decisions that need the whole
set (duplicates, source caps, splits, weights: sftops.data.curate) are taken on small per-row arrays; pass 2
streams the chunks again into the curated files."""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from sftops.config import Config
from sftops.data.card import write_card
from sftops.data.chunks import SPLIT_CODES
from sftops.data.curate import (
    Ledger,
    apply_length_policy,
    assign_splits,
    cap_sources,
    check_masks,
    map_all,
    refuse_too_few,
    remove_duplicates,
    rows_within,
    split_warnings,
    train_copies,
    write_outputs,
)
from sftops.data.split import ContaminationIndex
from sftops.data.tokenize import Renderer, length_summary
from sftops.jsonio import read_json, read_jsonl, require, write_json, write_jsonl
from sftops.layout import CURATED_REJECTED, INGEST_REPORT, RAW_REJECTED, STATS
from sftops.outputs import replaced_whole
from sftops.provenance.fingerprints import remember_digests


def run_format(cfg: Config) -> dict[str, Any]:
    from sftops.modeling import load_tokenizer

    raw = Path(cfg.paths.raw)
    for source in cfg.data.sources:
        require(raw / f"{source.name}.jsonl", "ingest")
    ingest = read_json(require(raw / INGEST_REPORT, "ingest"))
    with replaced_whole(cfg.paths.curated) as out, chunk_folder(Path(cfg.paths.curated)) as chunks:
        return _curate(cfg, load_tokenizer(cfg.model), raw, out, chunks, ingest)


@contextmanager
def chunk_folder(curated: Path):
    """Pass 1's files, beside the curated folder (on its disk), removed when the stage ends however it ends."""
    folder = curated.parent / f".{curated.name}.chunks"
    shutil.rmtree(folder, ignore_errors=True)  # left by a killed run
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _curate(cfg: Config, tokenizer: Any, raw: Path, out: Path, chunks: Path, ingest: dict[str, Any]) -> dict[str, Any]:
    d = cfg.data
    ledger = Ledger(d.sources, ingest)
    ledger.add_ingest_rejections(list(read_jsonl(raw / RAW_REJECTED)))
    render = Renderer(tokenizer)  # built once: it copies the tokenizer's Rust backend
    rows = map_all(cfg, tokenizer, render, raw, chunks, ingest, ledger)
    alive = remove_duplicates(rows, d.near_duplicate_threshold, d.sources, ledger)
    alive = cap_sources(rows, alive, d.sources, d.split_seed, ledger)
    split_of_alive = assign_splits(rows, alive)
    lengths = {part: rows.lengths[alive, k] for k, part in enumerate(("prompt", "response", "total"))}
    checked = check_masks(cfg, tokenizer, render, rows, alive, chunks)
    kept, overflow = apply_length_policy(cfg, rows, alive, ledger)
    split_code = np.full(len(rows), -1, dtype=np.int8)
    split_code[alive] = split_of_alive
    counts = {name: int((split_code[kept] == code).sum()) for name, code in SPLIT_CODES.items()}
    refuse_too_few(counts, cfg)
    warnings = split_warnings(counts, cfg)
    for warning in warnings:
        logging.getLogger("sftops").warning("format: %s", warning)
    plan = train_copies(rows, kept[split_code[kept] == SPLIT_CODES["train"]], d.sources, d.split_seed)

    test = kept[split_code[kept] == SPLIT_CODES["test"]]
    follow = {int(rows.prompt_keys[i]): p for i, p in rows.test_prompts.items()}
    contamination = ContaminationIndex([follow[int(rows.prompt_keys[i])] for i in test], d.contamination_ngram)
    written = write_outputs(cfg, tokenizer, rows, kept, split_code, plan, chunks, out, contamination)
    for index, source in enumerate(d.sources):
        ledger.counts[source.name]["train_rows"] = written["train_rows"][index]
    flagged = contamination.flagged(d.contamination_threshold)

    write_jsonl(out / CURATED_REJECTED, ledger.rejected)
    sources = ledger.per_source()
    stats = {
        "read": sum(s["read"] for s in sources.values()),
        "rejected": sum(s["rejected_ingest"] + s["rejected_format"] for s in sources.values()),
        "duplicates": sum(s["duplicates"] for s in sources.values()),
        "kept": sum(s["kept"] for s in sources.values()),
        "rejected_by_reason": dict(ledger.reasons.most_common()),
        "sources": sources,
        "unused_fields": {name: dict(c.most_common()) for name, c in ledger.unused.items() if c},
        "splits": written["splits"],
        "token_lengths": {part: length_summary(v) for part, v in lengths.items()},
        "rows_before_length": len(alive),
        "rows_kept_at_max_length": rows_within(lengths["total"], cfg.model.max_length),
        "overflow": overflow,
        "contamination": {
            "ngram": d.contamination_ngram,
            "threshold": d.contamination_threshold,
            "test_prompts": len(test),
            "flagged": len(flagged),
            "examples": [{"origin": rows.origin(test[i]), "overlap": round(o, 4)} for i, o in flagged[:20]],
        },
        "self_check": {"rows": checked},
        # The stage stops on a failed check, so written stats mean passed, if any row was checked; the promotion gate
        # reads this.
        "checks": {"mask_self_check": {"passed": checked > 0, "rows": checked}},
        "warnings": warnings,
        "ingest": ingest,
    }
    write_json(out / STATS, stats)
    write_json(
        out / INGEST_REPORT, ingest
    )  # carried along: train logs it without reading data/raw, which it does not depend on
    write_card(out, stats, lengths, cfg.model.max_length)
    remember_digests(out)  # hashed once here, so train and evaluate read the digests, not the gigabytes
    return stats
