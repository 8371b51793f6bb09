"""A row as a reader yields it: its fields, or why it could not be read, with the origin a user finds it by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Record:
    origin: str  # "file#row", enough for a user to find the row
    row: int  # 1-based record number within its file
    fields: dict[str, Any] | None = None
    error: str | None = None
    raw: str | None = None  # the unreadable text, kept (shortened) for the rejected file


def as_row(value: Any, origin: str, row: int) -> Record:
    if isinstance(value, dict):
        return Record(origin, row, fields=value)
    return Record(
        origin,
        row,
        error=(
            f"row is a {type(value).__name__}, expected an object "
            '(e.g. {"prompt": ..., "completion": ...} or {"messages": [...]})'
        ),
        raw=repr(value)[:500],
    )
