"""Readers for raw data sources. Each yields one Record per row: the row's fields, or why it could not be read."""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from sftops import hub
from sftops.config import MAX_ROW_BYTES, SourceConfig, SuiteConfig
from sftops.data.arrowrows import batch_records
from sftops.data.records import Record, as_row
from sftops.data.streams import BOM as BOM  # noqa: F401  (re-exported: tests write it)
from sftops.data.streams import bounded_lines, compression, open_bytes, require_content, utf8_error
from sftops.errors import DataError
from sftops.machine import package_dir
from sftops.redact import redact

# Objects and arrays nested deeper than this are refused: no chat row needs it, and deeper values reach
# Python's recursion limit in the JSON encoder and the schema mapping.
MAX_DEPTH = 64
# Rows of a Parquet file or hub dataset converted to Python at a time.
BATCH_ROWS = 1024

SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",  # tab-separated: read as csv, with tab as the delimiter
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
    """The file's whole content, decompressed (gzip or zstandard) according to its suffix: for the formats that
    cannot be read a row at a time (.json, .yaml, a compressed .parquet). An empty or whitespace-only file is an
    error: it is almost always a failed export, not an empty dataset."""
    with open_bytes(path) as fh:
        data = fh.read()
    if not data:
        raise DataError(f"{path}: the file is empty")
    if not data.strip():
        raise DataError(f"{path}: the file holds only whitespace")
    return data


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a key given twice is refused (json.loads would silently keep the last value)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(f"duplicate key {dup!r} in an object")
    return obj


def parse_json(text: str) -> Any:
    """json.loads that refuses duplicate keys and values nested deeper than MAX_DEPTH (ValueError)."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ValueError(f"nested too deeply (over {MAX_DEPTH} levels)") from None
    if _depth(value) > MAX_DEPTH:
        raise ValueError(f"nested too deeply (over {MAX_DEPTH} levels)")
    return value


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                break
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def resolve_files(source: SourceConfig) -> list[tuple[Path, str]]:
    """The files a path/folder/glob source names, sorted so that ingest is deterministic, each with the label
    its rows' origins use: '<package>:<path in package>' for package data, so that the raw data (and its DVC
    hash) does not depend on where the package is installed. A relative path stays inside the project folder
    (a package path inside its package), links included; files found in a folder stay inside that folder."""
    base = package_dir(source.package) if source.package else Path(".")
    assert source.path is not None
    target = base / source.path
    if target.is_file():
        files = [target]
    elif target.is_dir():
        files = sorted(p for p in target.rglob("*") if p.is_file() and _suffixes(p)[0] in SUFFIX_FORMATS)
    else:
        files = sorted(p for p in map(Path, glob.glob(str(target), recursive=True)) if p.is_file())
    if not files and target.is_dir():
        raise DataError(
            f"source {source.name!r}: the folder {str(target)!r} holds no file of a readable format; files ending "
            f"in {', '.join(SUFFIX_FORMATS)} (optionally followed by .gz or .zst) are read"
        )
    if not files:
        raise DataError(f"source {source.name!r}: nothing matches {str(target)!r}")
    boundary = target if target.is_dir() else None
    if source.package or not Path(source.path).is_absolute():
        boundary = base
    if boundary is not None:
        for f in files:
            contained(f, boundary)
    if source.package:
        return [(f, f"{source.package}:{f.relative_to(base).as_posix()}") for f in files]
    return [(f, str(f)) for f in files]


def contained(path: Path, boundary: Path) -> Path:
    """`path` with links resolved, if it lies inside `boundary`; DataError otherwise (a link or `..` leading
    out of the data's folder: give the absolute path in params.yaml if that file is really meant)."""
    real, root = path.resolve(), boundary.resolve()
    if not real.is_relative_to(root):
        how = f"a link to {real}" if path.is_symlink() or real != path.absolute() else "outside it"
        raise DataError(
            f"{path}: {how}, outside {root}; data files must stay inside the project's data folders "
            f"(write the absolute path in data.sources to read a file elsewhere)"
        )
    return real


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


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_jsonl(path: Path, label: str, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[Record]:
    """A Record per non-blank line, read as a stream: one line in memory at a time, and of a line over
    max_row_bytes only its head."""
    require_content(path)
    with open_bytes(path) as fh:
        row = 0
        for line_no, (line, size) in enumerate(bounded_lines(fh, max_row_bytes), start=1):
            if size <= max_row_bytes and not line.strip():
                continue
            row += 1
            origin = f"{label}#line{line_no}"
            if size > max_row_bytes:
                yield Record(
                    origin,
                    row,
                    error=f"row too large: {size:,} bytes, over data.max_row_bytes={max_row_bytes:,}",
                    raw=repr(line[:200]),
                )
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Record(
                    origin, row, error=f"not valid UTF-8 ({exc.reason} at byte {exc.start})", raw=repr(line[:500])
                )
                continue
            try:
                value = parse_json(text)
            except json.JSONDecodeError as exc:
                yield Record(origin, row, error=f"malformed JSON: {exc.msg} at column {exc.colno}", raw=text[:500])
                continue
            except ValueError as exc:  # a duplicate key, or nested too deeply
                yield Record(origin, row, error=f"malformed JSON: {exc}", raw=text[:500])
                continue
            if "\\ud" in text.lower() and not _encodable(value):
                yield Record(
                    origin,
                    row,
                    error="invalid Unicode: a lone surrogate escape (\\udXXX) is not a character",
                    raw=text[:500],
                )
                continue
            yield as_row(value, origin, row)


def _json_error(path: Path, text: str, exc: json.JSONDecodeError) -> DataError:
    """Where the document breaks; a trailing comma is named on the line that holds it (json reports the next one)."""
    before = text[: exc.pos].rstrip()
    if before.endswith(",") and text[exc.pos : exc.pos + 1] in ("]", "}"):
        line = text.count("\n", 0, len(before)) + 1
        return DataError(
            f"{path}: not valid JSON: a trailing comma at line {line} (before a closing {text[exc.pos]!r}); remove it"
        )
    return DataError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}")


def _json_lines(text: str, exc: json.JSONDecodeError) -> bool:
    """A document that breaks with 'Extra data' right after a first line that is a whole JSON object: JSON Lines."""
    first = text.lstrip().split("\n", 1)[0]
    if exc.msg != "Extra data" or not first.rstrip().endswith("}"):
        return False
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def read_json(path: Path, label: str, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[Record]:
    try:
        text = read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        value = parse_json(text)
    except json.JSONDecodeError as exc:
        if _json_lines(text, exc):
            raise DataError(
                f"{path}: holds JSON Lines (one object per line, as datasets' to_json writes), not one JSON document; "
                "rename it to .jsonl, or set format: jsonl on the source"
            ) from None
        raise _json_error(path, text, exc) from None
    except ValueError as exc:
        raise DataError(f"{path}: not a valid JSON document ({exc})") from None
    if isinstance(value, dict):  # one pretty-printed example: a source of one row
        value = [value]
    if not isinstance(value, list):
        raise DataError(
            f"{path}: a .json source must hold an array of objects or one object, not a {type(value).__name__}"
        )
    for row, item in enumerate(value, start=1):
        yield as_row(item, f"{label}#{row}", row)


def read_csv(path: Path, label: str, max_row_bytes: int = MAX_ROW_BYTES, delimiter: str = ",") -> Iterator[Record]:
    """A Record per CSV record after the header, read as a text stream (universal newlines, as the csv module
    wants them)."""
    require_content(path)
    csv.field_size_limit(max(max_row_bytes, csv.field_size_limit()))
    with io.TextIOWrapper(open_bytes(path), encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(text, strict=True, delimiter=delimiter)  # a stray or unclosed quote is an error
        try:
            yield from _csv_rows(reader, label, max_row_bytes)
        except (csv.Error, DataError, UnicodeDecodeError) as exc:
            # a UTF-8 error anywhere in the file is the one reported, as when the file was decoded whole first
            # (and the stream's own message counts from its chunk: utf8_error places it in the file)
            if broken := utf8_error(path):
                raise DataError(f"{path}: not valid UTF-8 ({broken})") from None
            if isinstance(exc, csv.Error):  # e.g. a quote left open until the end of the file
                raise DataError(f"{path} line {reader.line_num}: unreadable CSV ({exc})") from None
            raise


def _csv_rows(reader: Any, label: str, max_row_bytes: int) -> Iterator[Record]:
    header = next(reader, None)
    if not header:
        raise DataError(f"{label}: empty CSV (no header row)")
    row = 0
    for values in reader:
        origin = f"{label}#line{reader.line_num}"
        if not values:
            continue
        row += 1
        size = sum(len(v) for v in values)
        if size > max_row_bytes:
            yield Record(
                origin,
                row,
                error=f"row too large: {size:,} characters, over data.max_row_bytes={max_row_bytes:,}",
                raw=",".join(values)[:200],
            )
        elif len(values) != len(header):
            yield Record(
                origin, row, error=f"row has {len(values)} fields, header has {len(header)}", raw=",".join(values)[:500]
            )
        else:
            yield Record(origin, row, fields=dict(zip(header, values)))


def read_parquet(path: Path, label: str, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[Record]:
    """A Record per row, read a record batch at a time (a compressed file is decompressed into memory first:
    Parquet needs to seek)."""
    import pyarrow.parquet as pq

    require_content(path)
    try:
        # without pre-buffering, and through a small buffer, pyarrow holds one row group at a time (pre-buffered,
        # a 1,000,000-row file of 520 MB held 640 MB)
        parquet = pq.ParquetFile(
            io.BytesIO(read_bytes(path)) if compression(path) else path, pre_buffer=False, buffer_size=1 << 20
        )
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    yield from batch_records(_parquet_batches(parquet, path), label, max_row_bytes)


def _parquet_batches(parquet: Any, path: Path) -> Iterator[Any]:
    batches = parquet.iter_batches(batch_size=BATCH_ROWS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # a damaged row group, found when it is read
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        yield batch


class _DataLoader(yaml.BaseLoader):
    """BaseLoader without aliases: `*name` references let a few lines expand to billions of values."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not accepted in data files", self.peek_event().start_mark
            )
        return super().compose_node(parent, index)


def read_yaml(path: Path, label: str, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[Record]:
    # BaseLoader keeps every scalar a string: "Yes" stays "Yes", "4" stays "4" (text data, not YAML booleans).
    try:
        value = yaml.load(read_bytes(path).decode("utf-8-sig"), Loader=_DataLoader)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 YAML ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DataError(f"{path}: not valid UTF-8 YAML ({getattr(exc, 'problem', None) or exc}{where})") from None
    except RecursionError:
        raise DataError(f"{path}: YAML nested too deeply") from None
    if _depth(value) > MAX_DEPTH:
        raise DataError(f"{path}: YAML nested too deeply (over {MAX_DEPTH} levels)")
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
            yield as_row(item, f"{label}#{row}", row)
    else:
        raise DataError(f"{path}: YAML must be a list of rows or a mapping with a 'conversations' list")


def read_tsv(path: Path, label: str, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[Record]:
    """Tab-separated values: CSV with tab as the delimiter (read as commas, a row would be one field)."""
    yield from read_csv(path, label, max_row_bytes, delimiter="\t")


READERS = {
    "jsonl": read_jsonl,
    "json": read_json,
    "csv": read_csv,
    "tsv": read_tsv,
    "parquet": read_parquet,
    "yaml": read_yaml,
}


def hub_commit(source: SourceConfig) -> str | None:
    """The commit a hub source's revision names now (null: the default branch's), resolved online or from the local
    Hugging Face cache; None for a `hub` that is a local dataset folder (no revision)."""
    assert source.hub is not None
    where = "evaluate.suites" if isinstance(source, SuiteConfig) else "data.sources"
    if Path(source.hub).is_dir():
        if source.revision is not None:
            raise DataError(
                f"{where} {source.name!r}: revision {source.revision!r} applies to a hub dataset id, but "
                f"hub {source.hub!r} is a local folder; set its revision to null"
            )
        return None
    return hub.resolve(
        source.hub,
        source.revision,
        "dataset",
        f"{where} {source.name!r} (hub {source.hub!r})",
        f"the revision of {where} {source.name!r}",
        DataError,
    )


def pinned_source(source: SourceConfig) -> SourceConfig:
    """A hub source with its revision replaced by the commit it names now: read from it, the rows are the ones
    recorded, however the hub's branches move meanwhile."""
    if source.hub is None:
        return source
    return source.model_copy(update={"revision": hub_commit(source)})


def read_hub(source: SourceConfig, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[Record]:
    """A Hugging Face dataset by id at its revision's commit (from the hub, or offline from the local cache's
    snapshot of that commit), or any path `datasets.load_dataset` accepts; its rows checked against
    max_row_bytes like a local file's."""
    import datasets

    commit = hub_commit(source)  # a commit already cached is taken as it is, without asking the hub
    where, revision = source.hub, commit
    if commit is not None and hub.offline():
        # offline, load_dataset(id) ignores the hub cache (it falls back to its own cache of whatever version it
        # prepared last): the cached snapshot folder of the commit is the dataset
        where, revision = str(hub.cached_snapshot(source.hub, commit, "dataset")), None
    try:
        ds = datasets.load_dataset(where, source.hub_config, split=source.split, revision=revision)
    except Exception as exc:  # offline, unknown id, bad split: all reported the same way
        raise DataError(redact(f"source {source.name!r}: cannot load dataset {source.hub!r} ({exc})")) from None
    yield from batch_records(_hub_batches(ds), f"{source.hub}[{source.split}]", max_row_bytes)


def _hub_batches(ds: Any) -> Iterator[Any]:
    """The dataset's rows as Arrow record batches, without converting them to Python a row at a time: read from
    its Arrow cache files as streams when the dataset is exactly those files (as load_dataset leaves it), so that
    only a batch is in memory (memory-mapped, every page read would stay in the process's RSS); otherwise
    through its memory-mapped table and indices mapping."""
    import pyarrow as pa

    files = [f["filename"] for f in ds.cache_files]
    if (
        ds._indices is None and files and _stream_rows(files, ds.data.schema) == ds.num_rows
    ):  # no public "is it exactly these files"
        for name in files:
            with pa.OSFile(name) as fh:
                yield from pa.ipc.open_stream(fh)
        return
    for table in ds.with_format("arrow").iter(batch_size=BATCH_ROWS):
        yield from table.to_batches()


def _stream_rows(files: list[str], schema: Any) -> int:
    """Rows of Arrow IPC stream files, from their batches' headers (the data is skipped, not read); -1 when one
    is not a stream file or holds other columns than `schema`."""
    import pyarrow as pa

    rows = 0
    for name in files:
        with pa.memory_map(name) as fh:  # mapped, and only the batch headers touched
            try:
                reader = pa.ipc.open_stream(fh)
            except pa.ArrowInvalid:  # not a stream file (a later datasets may write another layout)
                return -1
            if not reader.schema.remove_metadata().equals(schema.remove_metadata()):
                return -1
            rows += sum(batch.num_rows for batch in reader)
    return rows


def read_source(source: SourceConfig, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[Record]:
    if source.hub is not None:
        yield from read_hub(source, max_row_bytes)
        return
    for path, label in resolve_files(source):
        yield from READERS[file_format(path, source.format)](path, label, max_row_bytes)
