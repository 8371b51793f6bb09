"""Rows refused and why: the counted kind of a reason, a tally that stays small however many rows are refused,
and the one-line error for a source none of whose rows survive (ingest and format both stop on it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from sftops.config import SourceConfig
from sftops.errors import DataError


def ingest_kind(reason: str) -> str:
    """The counted category of an ingest rejection reason."""
    if reason.startswith("row is a"):
        return "row not an object"
    if reason.startswith("row has"):
        return "wrong number of CSV fields"
    return reason.split(" (")[0].split(":")[0]


REASON_CHARS = 400  # of the first reason of a kind kept for the one-line stop message


def shortened(reason: str, limit: int = REASON_CHARS) -> str:
    """A long reason cut in its middle, not its end: the fix is said last, and must survive the cut."""
    if len(reason) <= limit:
        return reason
    tail = limit // 2
    return reason[: limit - tail - 5] + " ... " + reason[-tail:]


@dataclass
class ReasonTally:
    """How many rejections of each kind, and the first reason of each: all top_reasons needs, held in the room
    of a few reasons however many rows were rejected."""

    counts: Counter[str] = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str) -> None:
        kind = ingest_kind(reason)
        self.counts[kind] += 1
        self.first.setdefault(kind, shortened(reason))

    @classmethod
    def of(cls, reasons: Iterable[str]) -> ReasonTally:
        tally = cls()
        for reason in reasons:
            tally.add(reason)
        return tally


def top_reasons(reasons: Iterable[str] | ReasonTally, n: int = 3) -> str:
    """'40 no known schema (first: ...), 2 empty message': the commonest kinds with counts and one example."""
    tally = reasons if isinstance(reasons, ReasonTally) else ReasonTally.of(reasons)
    return "; ".join(f"{c} x {tally.first[k]}" for k, c in tally.counts.most_common(n))


def refuse_empty(source: SourceConfig, read: int, reasons: Iterable[str] | ReasonTally, stage: str) -> None:
    """A source none of whose rows survive is a user error, not an empty success."""
    if read == 0:
        raise DataError(
            f"source {source.name!r}: no rows were read from {source.path or source.hub}; "
            "check the path (an empty file or folder) and data.sources in params.yaml"
        )
    raise DataError(f"source {source.name!r}: none of its {read} rows was kept at {stage}: {top_reasons(reasons)}")
