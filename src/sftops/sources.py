"""Readers for raw data sources. Each yields one Record per row: the row's fields, or why it could not be read."""

from __future__ import annotations

import csv
import glob
import importlib.util
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sftops.config import SourceConfig
from sftops.errors import DataError

SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".yml": "yaml",
    ".yaml": "yaml",
}

# A file may be compressed: data.jsonl.gz, data.csv.zst, ... (the format comes from the suffix before).
COMPRESSIONS = (".gz", ".zst")


def _suffixes(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None) of a file name."""
    name = path.name.lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            return Path(name[: -len(comp)]).suffix, comp
    return path.suffix.lower(), None


def read_bytes(path: Path) -> bytes:
    """The file's content, decompressed (gzip or zstandard) according to its suffix."""
    _, comp = _suffixes(path)
    data = path.read_bytes()
    try:
        if comp == ".gz":
            import gzip

            return gzip.decompress(data)
        if comp == ".zst":
            import zstandard

            return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    except Exception as exc:  # gzip/zstandard raise several types for a corrupt file
        raise DataError(f"{path}: cannot decompress ({exc})") from None
    return data


@dataclass
class Record:
    origin: str  # "file#row", enough for a user to find the row
    row: int  # 1-based record number within its file
    fields: dict[str, Any] | None = None
    error: str | None = None
    raw: str | None = None  # the unreadable text, kept (shortened) for the rejected file


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed (pip install it, or fix data.sources)")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_files(source: SourceConfig) -> list[tuple[Path, str]]:
    """The files a path/folder/glob source names, sorted so that ingest is deterministic, each with the label
    its rows' origins use: '<package>:<path in package>' for package data, so that the raw data (and its DVC
    hash) does not depend on where the package is installed."""
    base = package_dir(source.package) if source.package else Path(".")
    assert source.path is not None
    target = base / source.path
    if target.is_file():
        files = [target]
    elif target.is_dir():
        files = sorted(p for p in target.rglob("*") if p.is_file() and _suffixes(p)[0] in SUFFIX_FORMATS)
    else:
        files = sorted(p for p in map(Path, glob.glob(str(target), recursive=True)) if p.is_file())
    if not files:
        raise DataError(f"source {source.name!r}: nothing matches {str(target)!r}")
    if source.package:
        return [(f, f"{source.package}:{f.relative_to(base).as_posix()}") for f in files]
    return [(f, str(f)) for f in files]


def file_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix, _ = _suffixes(path)
    try:
        return SUFFIX_FORMATS[suffix]
    except KeyError:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {suffix!r} (optionally followed by .gz or .zst); "
            f"set 'format' on the source to one of {sorted(set(SUFFIX_FORMATS.values()))}"
        ) from None


def _as_row(value: Any, origin: str, row: int) -> Record:
    if isinstance(value, dict):
        return Record(origin, row, fields=value)
    return Record(origin, row, error=f"row is a {type(value).__name__}, expected an object", raw=repr(value)[:500])


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_jsonl(path: Path, label: str) -> Iterator[Record]:
    with io.BytesIO(read_bytes(path)) as fh:
        row = 0
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row += 1
            origin = f"{label}#line{line_no}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Record(origin, row, error=f"not valid UTF-8 ({exc.reason} at byte {exc.start})", raw=repr(line[:500]))
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Record(origin, row, error=f"malformed JSON: {exc.msg} at column {exc.colno}", raw=text[:500])
                continue
            if "\\ud" in text.lower() and not _encodable(value):
                yield Record(origin, row, error="invalid Unicode: a lone surrogate escape (\\udXXX) is not a character", raw=text[:500])
                continue
            yield _as_row(value, origin, row)


def read_json(path: Path, label: str) -> Iterator[Record]:
    try:
        value = json.loads(read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a valid UTF-8 JSON document ({exc})") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: a .json source must hold an array of objects (use .jsonl for one object per line)")
    for row, item in enumerate(value, start=1):
        yield _as_row(item, f"{label}#{row}", row)


def read_csv(path: Path, label: str) -> Iterator[Record]:
    try:
        text = read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise DataError(f"{path}: empty CSV (no header row)")
    for row, values in enumerate(reader, start=1):
        origin = f"{label}#line{reader.line_num}"
        if not values:
            row -= 1
            continue
        if len(values) != len(header):
            yield Record(origin, row, error=f"row has {len(values)} fields, header has {len(header)}", raw=",".join(values)[:500])
            continue
        yield Record(origin, row, fields=dict(zip(header, values)))


def read_parquet(path: Path, label: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(read_bytes(path)))
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    for row, item in enumerate(table.to_pylist(), start=1):
        yield _as_row(item, f"{label}#{row}", row)


def read_yaml(path: Path, label: str) -> Iterator[Record]:
    # BaseLoader keeps every scalar a string: "Yes" stays "Yes", "4" stays "4" (text data, not YAML booleans).
    try:
        value = yaml.load(read_bytes(path).decode("utf-8"), Loader=yaml.BaseLoader)
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: not valid UTF-8 YAML ({exc})") from None
    if isinstance(value, dict) and isinstance(value.get("conversations"), list):
        # chatterbot-corpus layout: categories + a list of turn lists.
        categories = value.get("categories") or []
        for row, conv in enumerate(value["conversations"], start=1):
            origin = f"{label}#{row}"
            if isinstance(conv, list):
                yield Record(origin, row, fields={"conversation": conv, "categories": categories})
            else:
                yield Record(origin, row, error="conversation is not a list of turns", raw=repr(conv)[:500])
    elif isinstance(value, list):
        for row, item in enumerate(value, start=1):
            yield _as_row(item, f"{label}#{row}", row)
    else:
        raise DataError(f"{path}: YAML must be a list of rows or a mapping with a 'conversations' list")


READERS = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv, "parquet": read_parquet, "yaml": read_yaml}


def read_hub(source: SourceConfig) -> Iterator[Record]:
    """A Hugging Face dataset by id (needs network), or any path `datasets.load_dataset` accepts."""
    import datasets

    try:
        ds = datasets.load_dataset(source.hub, source.hub_config, split=source.split)
    except Exception as exc:  # offline, unknown id, bad split: all reported the same way
        raise DataError(f"source {source.name!r}: cannot load dataset {source.hub!r} ({exc})") from None
    for row, item in enumerate(ds, start=1):
        yield _as_row(item, f"{source.hub}[{source.split}]#{row}", row)


def read_source(source: SourceConfig) -> Iterator[Record]:
    if source.hub is not None:
        yield from read_hub(source)
        return
    for path, label in resolve_files(source):
        yield from READERS[file_format(path, source.format)](path, label)
