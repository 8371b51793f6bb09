"""Small helpers for the JSON and JSON Lines files the stages exchange."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sftops.errors import DataError
from sftops.outputs import write_bytes


def require(path: Path, producer: str) -> Path:
    """An input a previous stage should have written; a clear message when it has not."""
    if not Path(path).exists():
        raise DataError(f"{path} not found: run `sftops {producer}` (or `dvc repro`) first")
    return Path(path)


def jsonl_line(row: dict[str, Any]) -> str:
    """One row as a JSON Lines line (UTF-8 text as it is, not escaped)."""
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(jsonl_line(row))
            n += 1
    return n


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def write_json(path: Path, value: Any) -> None:
    write_bytes(Path(path), (json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
