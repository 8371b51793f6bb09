"""Stage 1, ingest: copy every readable row of every source into data/raw, and every unreadable one into
data/raw/rejected.jsonl with its origin and reason. For each source, read = kept + rejected."""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sftops.config import Config, SourceConfig
from sftops.errors import DataError
from sftops.jsonio import write_json, write_jsonl
from sftops.outputs import replaced_whole
from sftops.sources import pinned_source, read_source

REPORT = "ingest_report.json"
REJECTED = "rejected.jsonl"


def ingest_kind(reason: str) -> str:
    """The counted category of an ingest rejection reason."""
    if reason.startswith("row is a"):
        return "row not an object"
    if reason.startswith("row has"):
        return "wrong number of CSV fields"
    return reason.split(" (")[0].split(":")[0]


def top_reasons(reasons: list[str], n: int = 3) -> str:
    """'40 no known schema (first: ...), 2 empty message': the commonest kinds with counts and one example."""
    counts = Counter(ingest_kind(r) for r in reasons)
    first = {}
    for r in reasons:
        first.setdefault(ingest_kind(r), r)
    return "; ".join(f"{c} x {first[k][:400]}" for k, c in counts.most_common(n))


def refuse_empty(source: SourceConfig, read: int, reasons: list[str], stage: str) -> None:
    """A source none of whose rows survive is a user error, not an empty success."""
    if read == 0:
        raise DataError(f"source {source.name!r}: no rows were read from {source.path or source.hub}; "
                        "check the path (an empty file or folder) and data.sources in params.yaml")
    raise DataError(f"source {source.name!r}: none of its {read} rows was kept at {stage}: {top_reasons(reasons)}")


def run_ingest(cfg: Config) -> dict[str, Any]:
    with replaced_whole(cfg.paths.raw) as out:
        return _ingest(cfg, out)


def _ingest(cfg: Config, out: Path) -> dict[str, Any]:
    rejected: list[dict[str, Any]] = []
    per_source: dict[str, dict[str, int]] = {}
    revisions: dict[str, dict[str, str | None]] = {}
    for requested in cfg.data.sources:
        source = pinned_source(requested)  # a hub dataset: read at the commit its revision names now
        if source.hub is not None:
            revisions[source.name] = {"hub": source.hub, "requested": requested.revision, "commit": source.revision}
        counts = {"read": 0, "kept": 0, "rejected": 0}

        def kept_rows():
            for rec in tqdm(read_source(source, cfg.data.max_row_bytes), desc=f"ingest {source.name}", unit=" rows", leave=False):
                counts["read"] += 1
                if rec.error is None:
                    counts["kept"] += 1
                    yield {"source": source.name, "origin": rec.origin, "fields": rec.fields}
                else:
                    counts["rejected"] += 1
                    rejected.append(
                        {"source": source.name, "origin": rec.origin, "row": rec.row, "reason": rec.error, "raw": rec.raw}
                    )

        with contextlib.closing(kept_rows()) as rows:  # closed on a failed write too: the progress bar ends its line
            write_jsonl(out / f"{source.name}.jsonl", rows)
        assert counts["read"] == counts["kept"] + counts["rejected"]
        if counts["kept"] == 0 and cfg.data.stop_on_empty_source:
            refuse_empty(source, counts["read"], [r["reason"] for r in rejected if r["source"] == source.name], "ingest")
        per_source[source.name] = counts
    write_jsonl(out / REJECTED, rejected)
    totals = {k: sum(c[k] for c in per_source.values()) for k in ("read", "kept", "rejected")}
    # the hub sources' commits: train records them (manifest, MLflow) from the copy format carries along
    report = {"totals": totals, "sources": per_source, "revisions": revisions}
    write_json(out / REPORT, report)
    return report
