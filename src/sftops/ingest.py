"""Stage 1, ingest: copy every readable row of every source into data/raw, and every unreadable one into
data/raw/rejected.jsonl with its origin and reason. For each source, read = kept + rejected."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sftops.config import Config
from sftops.jsonio import write_json, write_jsonl
from sftops.outputs import replaced_whole
from sftops.sources import read_source

REPORT = "ingest_report.json"
REJECTED = "rejected.jsonl"


def run_ingest(cfg: Config) -> dict[str, Any]:
    with replaced_whole(cfg.paths.raw) as out:
        return _ingest(cfg, out)


def _ingest(cfg: Config, out: Path) -> dict[str, Any]:
    rejected: list[dict[str, Any]] = []
    per_source: dict[str, dict[str, int]] = {}
    for source in cfg.data.sources:
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
        per_source[source.name] = counts
    write_jsonl(out / REJECTED, rejected)
    totals = {k: sum(c[k] for c in per_source.values()) for k in ("read", "kept", "rejected")}
    report = {"totals": totals, "sources": per_source}
    write_json(out / REPORT, report)
    return report
