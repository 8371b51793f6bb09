"""Stage 1, ingest: copy every readable row of every source into data/raw, and every unreadable one into
data/raw/rejected.jsonl with its origin and reason. For each source, read = kept + rejected."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from sftops.config import Config, SourceConfig
from sftops.data.rejections import ReasonTally, ingest_kind, refuse_empty
from sftops.data.sources import pinned_source, read_source
from sftops.jsonio import jsonl_line, write_json, write_jsonl
from sftops.layout import INGEST_REPORT, RAW_REJECTED
from sftops.outputs import replaced_whole


def run_ingest(cfg: Config) -> dict[str, Any]:
    with replaced_whole(cfg.paths.raw) as out:
        return _ingest(cfg, out)


def _ingest(cfg: Config, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    with (out / RAW_REJECTED).open("w", encoding="utf-8") as rejected_file:  # written as rows come: never held
        per_source, revisions = _ingest_sources(cfg, out, rejected_file)
    totals = {k: sum(c[k] for c in per_source.values()) for k in ("read", "kept", "rejected")}
    # the hub sources' commits: train records them (manifest, MLflow) from the copy format carries along
    report = {"totals": totals, "sources": per_source, "revisions": revisions}
    write_json(out / INGEST_REPORT, report)
    return report


def _ingest_sources(cfg: Config, out: Path, rejected_file: TextIO) -> tuple[dict[str, dict[str, int]], dict[str, Any]]:
    """Each source's kept rows into its own file and its rejected rows onto rejected_file: (counts, revisions)."""
    per_source: dict[str, dict[str, int]] = {}
    revisions: dict[str, dict[str, str | None]] = {}
    for requested in cfg.data.sources:
        source = pinned_source(requested)  # a hub dataset: read at the commit its revision names now
        if source.hub is not None:
            revisions[source.name] = {"hub": source.hub, "requested": requested.revision, "commit": source.revision}
        counts = {"read": 0, "kept": 0, "rejected": 0}
        reasons = ReasonTally()
        rows_of = _kept_rows(source, cfg.data.max_row_bytes, counts, reasons, rejected_file)
        with contextlib.closing(rows_of) as rows:  # closed on a failed write too: the progress bar ends its line
            write_jsonl(out / f"{source.name}.jsonl", rows)
        assert counts["read"] == counts["kept"] + counts["rejected"]
        if counts["kept"] == 0 and cfg.data.stop_on_empty_source:
            refuse_empty(source, counts["read"], reasons, "ingest")
        per_source[source.name] = counts
    return per_source, revisions


def _kept_rows(
    source: SourceConfig, max_row_bytes: int, counts: dict[str, int], reasons: ReasonTally, rejected_file: TextIO
) -> Iterator[dict[str, Any]]:
    """The source's readable rows; each unreadable one goes onto rejected_file, and counts and reasons tally both."""
    # leave=True: the bar's last line, with the count, stays in a log (a cleared bar left "0 rows" there, its
    # first and only line written before the rows came)
    for rec in tqdm(read_source(source, max_row_bytes), desc=f"ingest {source.name}", unit=" rows", leave=True):
        counts["read"] += 1
        if rec.error is None:
            counts["kept"] += 1
            yield {"source": source.name, "origin": rec.origin, "fields": rec.fields}
        else:
            counts["rejected"] += 1
            reasons.add(rec.error)
            rejected_file.write(
                jsonl_line(
                    {
                        "source": source.name,
                        "origin": rec.origin,
                        "row": rec.row,
                        "kind": ingest_kind(rec.error),  # as the curated copy counts it
                        "reason": rec.error,
                        "raw": rec.raw,
                    }
                )
            )
