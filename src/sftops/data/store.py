"""The curated dataset on disk: one Parquet file per split with the canonical schema, and the tokenised
cache next to it (flat memory-mappable arrays), keyed by (data hash, tokenizer hash, template hash, max_length,
overflow policy)."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from sftops.config import Config
from sftops.encoded import IGNORE, Encoded
from sftops.errors import DataError
from sftops.provenance.fingerprints import file_sha256, json_sha256

SPLITS = ("train", "val", "test")
TOKENIZED = "tokenized"
CACHE_KEY = "key.json"

MESSAGE = pa.struct(
    [
        ("role", pa.string()),
        ("content", pa.string()),
        ("weight", pa.int8()),  # null: 1 (a target, for assistant turns)
        ("tool_calls", pa.string()),  # JSON, null when none
        ("tool_call_id", pa.string()),
        ("name", pa.string()),
    ]
)
SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # hash of the conversation
        ("source", pa.string()),  # the data.sources name, kept to the end (evaluation reports per source)
        ("origin", pa.string()),  # file#row of the raw row
        ("split", pa.string()),
        ("messages", pa.list_(MESSAGE)),
        ("tools", pa.string()),  # JSON list of tool definitions, null when none
        # data.overflow: truncate_prompt: the conversation as trained (JSON, null when not cut) and what was cut
        ("messages_as_trained", pa.string()),
        ("prompt_tokens_cut", pa.int32()),
        ("response_tokens_lost", pa.int32()),
    ]
)
# The tokenised cache, per split: flat arrays (raw .bin files in this machine's byte order, memory-mapped by the
# reader) and the ids
ARRAYS = {"input_ids": np.int32, "labels": np.int32, "offsets": np.int64, "truncated": np.bool_, "lost": np.int32}
IDS = "ids.arrow"
ID_SCHEMA = pa.schema([("id", pa.string())])


def split_file(curated: Path, split: str) -> Path:
    return Path(curated) / f"{split}.parquet"


def _json_or_none(value: Any) -> str | None:
    return json.dumps(value, ensure_ascii=False) if value else None


def rows_table(rows: list[dict[str, Any]], schema: pa.Schema = SCHEMA, **extra: list[Any]) -> pa.Table:
    """Curated rows as a table of `schema` (SCHEMA and the `extra` columns): tool calls, tools and the messages
    as trained as JSON, null when absent. Built column by column: a record dict per row and from_pylist took
    18 µs a row, this 13."""
    messages = [m for row in rows for m in row["messages"]]
    turns = pa.StructArray.from_arrays(
        [
            pa.array([m["role"] for m in messages], pa.string()),
            pa.array([m["content"] for m in messages], pa.string()),
            pa.array([m.get("weight") for m in messages], pa.int8()),
            pa.array([_json_or_none(m.get("tool_calls")) for m in messages], pa.string()),
            pa.array([m.get("tool_call_id") for m in messages], pa.string()),
            pa.array([m.get("name") for m in messages], pa.string()),
        ],
        fields=list(MESSAGE),
    )
    ends = np.cumsum([0] + [len(row["messages"]) for row in rows], dtype=np.int32)
    columns = {
        "id": [row["id"] for row in rows],
        "source": [row["source"] for row in rows],
        "origin": [row["origin"] for row in rows],
        "split": [row["split"] for row in rows],
        "messages": pa.ListArray.from_arrays(pa.array(ends), turns, type=schema.field("messages").type),
        "tools": [_json_or_none(row.get("tools")) for row in rows],
        "messages_as_trained": [_json_or_none(row.get("messages_as_trained")) for row in rows],
        "prompt_tokens_cut": [row.get("prompt_tokens_cut", 0) for row in rows],
        "response_tokens_lost": [row.get("response_tokens_lost", 0) for row in rows],
        **extra,
    }
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)


def _from_record(rec: dict[str, Any]) -> dict[str, Any]:
    messages = []
    for m in rec["messages"]:
        msg = {"role": m["role"], "content": m["content"]}
        if m["weight"] is not None:
            msg["weight"] = m["weight"]
        if m["tool_calls"] is not None:
            msg["tool_calls"] = json.loads(m["tool_calls"])
        for key in ("tool_call_id", "name"):
            if m[key] is not None:
                msg[key] = m[key]
        messages.append(msg)
    return {**rec, "messages": messages, "tools": json.loads(rec["tools"]) if rec["tools"] else None}


ROW_GROUP = (
    10_000  # rows per Parquet row group / Arrow record batch: fixed, so the files' bytes depend on the rows only
)


class RowBatcher:
    """Tables appended in any sizes, handed on in slices of exactly `size` rows (the last one shorter): a file
    written through it has the same layout, byte for byte, however its producer chunked the rows."""

    def __init__(self, write: Any, size: int = ROW_GROUP) -> None:
        self.write, self.size, self.pending, self.rows = write, size, [], 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= self.size:
            whole = pa.concat_tables(self.pending)
            cut = self.rows - self.rows % self.size
            for start in range(0, cut, self.size):  # one batch each: a table's chunks would be batches of their own
                self.write(whole.slice(start, self.size).combine_chunks())
            self.pending, self.rows = [whole.slice(cut)], self.rows - cut

    def flush(self) -> None:
        if self.rows:
            self.write(pa.concat_tables(self.pending).combine_chunks())
        self.pending, self.rows = [], 0


class SplitWriter:
    """A curated split file written table by table (the canonical schema), in row groups of ROW_GROUP rows."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(path, SCHEMA)
        self.batcher = RowBatcher(lambda t: self.writer.write_table(t, row_group_size=ROW_GROUP))

    def add(self, table: pa.Table) -> None:
        self.batcher.add(table.select(SCHEMA.names).cast(SCHEMA))

    def close(self) -> None:
        self.batcher.flush()
        self.writer.close()


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [_from_record(r) for r in pq.read_table(path, schema=SCHEMA).to_pylist()]


def _existing_split(curated: str | Path, split: str) -> Path:
    path = split_file(Path(curated), split)
    if not path.exists():
        raise DataError(f"{path} not found: run `sftops format` (or `dvc repro`) first")
    return path


def read_split(curated: str | Path, split: str) -> list[dict[str, Any]]:
    """The one reader of the curated data (train and evaluate use it): rows with id, source, origin, split,
    messages (canonical dicts) and tools."""
    return read_rows(_existing_split(curated, split))


def read_columns(curated: str | Path, split: str, columns: list[str]) -> pa.Table:
    """Only these columns of a split (Parquet column projection): the conversations are not read."""
    return pq.read_table(_existing_split(curated, split), columns=columns, schema=SCHEMA)


# ---- the tokenised cache --------------------------------------------------------------------------------


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def data_hash(curated: Path) -> str:
    """Of the curated split files' bytes (each file's sha256, the one the run manifest records, so train
    start-up reads the format stage's recorded digests rather than the files): any change to the data changes it."""
    files = {split: split_file(curated, split) for split in SPLITS}
    return json_sha256({split: file_sha256(path) if path.exists() else None for split, path in files.items()})


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    if getattr(tokenizer, "is_fast", False):
        body = tokenizer.backend_tokenizer.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha(body + json.dumps(tokenizer.special_tokens_map, sort_keys=True))


def cache_key(curated: Path, tokenizer: PreTrainedTokenizerBase, max_length: int, overflow: str) -> dict[str, Any]:
    return {
        "data": data_hash(curated),
        "tokenizer": tokenizer_hash(tokenizer),
        "template": _sha(tokenizer.chat_template or ""),
        "max_length": max_length,
        "overflow": overflow,
    }


class TokenCacheWriter:
    """Writes the tokenised cache split by split, in chunks, as flat arrays a reader memory-maps without copying:
    per split a folder with input_ids/labels (int32, all rows end to end), offsets (int64, rows + 1),
    truncated (bool), lost (int32, answer tokens of older exchanges dropped by truncate_prompt) and ids (an Arrow
    IPC file).

    key.json is written last, by close(): an interrupted write leaves no key, so it is never taken for a valid cache."""

    def __init__(self, curated: Path, key: dict[str, Any]) -> None:
        self.folder = Path(curated) / TOKENIZED
        self.key = key
        shutil.rmtree(self.folder, ignore_errors=True)  # an old cache (and its key) must not outlive this write
        self.folder.mkdir(parents=True)
        self._files: dict[str, dict[str, Any]] = {}
        self._tokens: dict[str, int] = {}
        self._ids: dict[str, pa.ipc.RecordBatchFileWriter] = {}
        self._id_batches: dict[str, RowBatcher] = {}

    def _open(self, split: str) -> None:
        folder = self.folder / split
        folder.mkdir()
        self._files[split] = {name: open(folder / f"{name}.bin", "wb") for name in ARRAYS}
        self._files[split]["offsets"].write(np.zeros(1, dtype=np.int64).tobytes())
        self._tokens[split] = 0
        self._ids[split] = pa.ipc.new_file(str(folder / IDS), ID_SCHEMA)
        self._id_batches[split] = RowBatcher(self._ids[split].write_table)

    def add(
        self, split: str, row_ids: list[str], encodings: list[Encoded], truncated: list[bool], lost: list[int]
    ) -> None:
        if not len(row_ids) == len(encodings) == len(truncated) == len(lost):
            raise ValueError("row_ids, encodings, truncated and lost must have one entry per row")
        if split not in self._files:
            self._open(split)
        lengths = np.fromiter((len(e.input_ids) for e in encodings), dtype=np.int64, count=len(encodings))
        total = int(lengths.sum())
        files = self._files[split]
        files["input_ids"].write(_flat([e.input_ids for e in encodings], total).tobytes())
        files["labels"].write(_flat([e.labels for e in encodings], total).tobytes())
        files["offsets"].write((self._tokens[split] + np.cumsum(lengths)).astype(np.int64).tobytes())
        files["truncated"].write(np.asarray(truncated, dtype=np.bool_).tobytes())
        files["lost"].write(np.asarray(lost, dtype=np.int32).tobytes())
        self._tokens[split] += total
        self._id_batches[split].add(pa.table({"id": pa.array(row_ids, pa.string())}, schema=ID_SCHEMA))

    def add_arrays(
        self,
        split: str,
        row_ids: pa.Array,
        input_ids: np.ndarray,
        labels: np.ndarray,
        lengths: np.ndarray,
        truncated: np.ndarray,
        lost: np.ndarray,
    ) -> None:
        """As add(), for rows already flat: input_ids and labels end to end, each row's length."""
        if not len(row_ids) == len(lengths) == len(truncated) == len(lost) or len(input_ids) != int(lengths.sum()):
            raise ValueError("one id, length, truncated and lost per row; as many tokens as the lengths sum to")
        if split not in self._files:
            self._open(split)
        files = self._files[split]
        files["input_ids"].write(np.asarray(input_ids, dtype=np.int32).tobytes())
        files["labels"].write(np.asarray(labels, dtype=np.int32).tobytes())
        files["offsets"].write((self._tokens[split] + np.cumsum(lengths)).astype(np.int64).tobytes())
        files["truncated"].write(np.asarray(truncated, dtype=np.bool_).tobytes())
        files["lost"].write(np.asarray(lost, dtype=np.int32).tobytes())
        self._tokens[split] += int(lengths.sum())
        self._id_batches[split].add(pa.table({"id": pa.array(row_ids, pa.string())}, schema=ID_SCHEMA))

    def _finish_files(self) -> None:
        for batcher in self._id_batches.values():
            batcher.flush()
        for files in self._files.values():
            for f in files.values():
                f.close()
        for writer in self._ids.values():
            writer.close()
        self._files, self._ids, self._id_batches = {}, {}, {}

    def close(self) -> None:
        for split in SPLITS:  # a split with no rows is an empty cache, not a missing one
            if split not in self._files:
                self._open(split)
        self._finish_files()
        (self.folder / CACHE_KEY).write_text(json.dumps(self.key, indent=2) + "\n")

    def __enter__(self) -> TokenCacheWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._finish_files()  # no key: the partial cache stays invalid


def _flat(rows: list[Any], total: int) -> np.ndarray:
    """The rows end to end; rows given as numpy arrays (a chunked producer) are joined without Python ints."""
    if rows and all(isinstance(r, np.ndarray) for r in rows):
        return np.concatenate(rows).astype(np.int32, copy=False)
    return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=total)


def write_cache(curated: Path, key: dict[str, Any], encoded: dict[str, list[tuple[str, Encoded, bool, int]]]) -> None:
    """encoded: split -> [(row id, encoding, truncated, answer tokens of dropped exchanges)]."""
    with TokenCacheWriter(curated, key) as writer:
        for split, rows in encoded.items():
            writer.add(split, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])


@dataclass(frozen=True)
class TokenRows:
    """Tokenised rows backed by flat (memory-mapped) arrays: row i is input_ids[starts[i]:ends[i]] (and the same
    slice of labels). Indexing with an int gives one Encoded (lists built for that row only), so a TokenRows
    serves as a Sequence[Encoded]; select() takes a subset without touching the tokens."""

    ids: pa.ChunkedArray
    input_ids: np.ndarray
    labels: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    truncated: np.ndarray
    lost: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def __len__(self) -> int:
        return len(self.starts)

    def row(self, i: int) -> Encoded:
        start, end = int(self.starts[i]), int(self.ends[i])
        return Encoded(self.input_ids[start:end].tolist(), self.labels[start:end].tolist())

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return self.select(np.arange(len(self))[i])
        return self.row(i)

    def __iter__(self) -> Iterator[Encoded]:
        return (self.row(i) for i in range(len(self)))

    def select(self, indices: Any) -> TokenRows:
        """The rows at `indices` (in that order); the flat token arrays are shared, not copied."""
        idx = np.asarray(indices, dtype=np.int64)
        return TokenRows(
            self.ids.take(pa.array(idx)),
            self.input_ids,
            self.labels,
            self.starts[idx],
            self.ends[idx],
            self.truncated[idx],
            self.lost[idx],
        )

    def target_counts(self) -> np.ndarray:
        """Per row, the labels that enter the loss (those after its first position that are not IGNORE)."""
        supervised = np.concatenate([[0], np.cumsum(self.labels != IGNORE, dtype=np.int64)])
        return supervised[self.ends] - supervised[np.minimum(self.starts + 1, self.ends)]


def _mapped(path: Path, dtype: Any) -> np.ndarray:
    # np.memmap refuses an empty file; an empty split is an empty array
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.empty(0, dtype=dtype)


def read_cache(curated: Path, split: str, key: dict[str, Any]) -> TokenRows | None:
    """The split's cached rows, memory-mapped, or None when the cache was made with another data, tokenizer,
    template, max_length or overflow policy, or is incomplete."""
    folder = Path(curated) / TOKENIZED
    try:
        stored = json.loads((folder / CACHE_KEY).read_text())
    except (OSError, ValueError):
        return None
    files = [folder / split / f"{name}.bin" for name in ARRAYS] + [folder / split / IDS]
    if stored != key or not all(f.exists() for f in files):
        return None
    arrays = {name: _mapped(folder / split / f"{name}.bin", dtype) for name, dtype in ARRAYS.items()}
    ids = pa.ipc.open_file(pa.memory_map(str(folder / split / IDS))).read_all().column("id")
    offsets, n = arrays["offsets"], len(ids)
    if not (
        len(offsets) == n + 1 == len(arrays["truncated"]) + 1 == len(arrays["lost"]) + 1
        and offsets[-1] == len(arrays["input_ids"]) == len(arrays["labels"])
    ):
        return None
    return TokenRows(
        ids, arrays["input_ids"], arrays["labels"], offsets[:-1], offsets[1:], arrays["truncated"], arrays["lost"]
    )


def load_split(cfg: Config, split: str) -> list[dict[str, Any]]:
    return read_split(cfg.paths.curated, split)
