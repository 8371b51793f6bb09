"""The streamed readers give the Records (or the error) that reading each file whole gives: on every JSONL and CSV
file of tests/corpus and tests/hostile, plain and compressed, with a small row limit too, and on random bytes.
The whole-file readers below are the reference: what sftops did before it streamed, decoded once, split once."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftops.config import SourceConfig
from sftops.data.arrowrows import row_bytes
from sftops.data.records import Record, as_row
from sftops.data.rejections import ReasonTally, ingest_kind, top_reasons
from sftops.data.sources import BOM, parse_json, read_csv, read_hub, read_jsonl, read_parquet
from sftops.errors import DataError

TESTS = Path(__file__).parent
FILES = sorted(
    p
    for folder in (TESTS / "corpus", TESTS / "hostile" / "files")
    for p in folder.iterdir()
    if p.suffix in (".jsonl", ".csv")
)


def whole_bytes(data: bytes, path: Path) -> bytes:
    if not data:
        raise DataError(f"{path}: the file is empty")
    if not data.strip():
        raise DataError(f"{path}: the file holds only whitespace")
    return data


def whole_jsonl(data: bytes, path: Path, label: str, max_row_bytes: int) -> list[Record]:
    data = whole_bytes(data, path)
    records, row = [], 0
    for line_no, line in enumerate(io.BytesIO(data[len(BOM) :] if data.startswith(BOM) else data), start=1):
        if not line.strip():
            continue
        row += 1
        origin = f"{label}#line{line_no}"
        if len(line) > max_row_bytes:
            records.append(
                Record(
                    origin,
                    row,
                    error=f"row too large: {len(line):,} bytes, over data.max_row_bytes={max_row_bytes:,}",
                    raw=repr(line[:200]),
                )
            )
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            records.append(
                Record(origin, row, error=f"not valid UTF-8 ({exc.reason} at byte {exc.start})", raw=repr(line[:500]))
            )
            continue
        try:
            value = parse_json(text)
        except json.JSONDecodeError as exc:
            records.append(
                Record(origin, row, error=f"malformed JSON: {exc.msg} at column {exc.colno}", raw=text[:500])
            )
            continue
        except ValueError as exc:
            records.append(Record(origin, row, error=f"malformed JSON: {exc}", raw=text[:500]))
            continue
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            records.append(
                Record(
                    origin,
                    row,
                    error="invalid Unicode: a lone surrogate escape (\\udXXX) is not a character",
                    raw=text[:500],
                )
            )
            continue
        records.append(as_row(value, origin, row))
    return records


def whole_csv(data: bytes, path: Path, label: str, max_row_bytes: int) -> list[Record]:
    try:
        text = whole_bytes(data, path).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records, row = [], 0
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{label}: empty CSV (no header row)")
        for values in reader:
            origin = f"{label}#line{reader.line_num}"
            if not values:
                continue
            row += 1
            size = sum(len(v) for v in values)
            if size > max_row_bytes:
                records.append(
                    Record(
                        origin,
                        row,
                        error=f"row too large: {size:,} characters, over data.max_row_bytes={max_row_bytes:,}",
                        raw=",".join(values)[:200],
                    )
                )
            elif len(values) != len(header):
                records.append(
                    Record(
                        origin,
                        row,
                        error=f"row has {len(values)} fields, header has {len(header)}",
                        raw=",".join(values)[:500],
                    )
                )
            else:
                records.append(Record(origin, row, fields=dict(zip(header, values))))
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: unreadable CSV ({exc})") from None
    return records


def outcome(read, *args):
    """The Records a reader gives, or the message of the DataError it raises."""
    try:
        return list(read(*args))
    except DataError as exc:
        return f"DataError: {exc}"


def compressed(data: bytes, comp: str) -> bytes:
    if comp == ".gz":
        return gzip.compress(data)
    return zstandard.ZstdCompressor().compress(data) if comp == ".zst" else data


@pytest.mark.parametrize("max_row_bytes", [4_000_000, 64])
@pytest.mark.parametrize("comp", ["", ".gz", ".zst"])
def test_streamed_readers_match_whole_file_reading_on_the_corpus(tmp_path, comp, max_row_bytes):
    for original in FILES:
        data = original.read_bytes()
        path = tmp_path / (original.name + comp)
        path.write_bytes(compressed(data, comp))
        stream, whole = (read_jsonl, whole_jsonl) if original.suffix == ".jsonl" else (read_csv, whole_csv)
        assert outcome(stream, path, "f", max_row_bytes) == outcome(whole, data, path, "f", max_row_bytes), (
            original.name
        )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(
        st.sampled_from(
            [
                b"\n",
                b"\r\n",
                b"\r",
                b" ",
                b"\t",
                BOM,
                b"\xff",
                b"\xc3",
                b"\xa9",
                b'{"a": 1}',
                b'{"a": "\\ud800"}',
                b"[1]",
                b"x,y",
                b'"q',
                b"\x00",
            ]
        ),
        max_size=30,
    ),
    max_row_bytes=st.integers(1, 40),
    comp=st.sampled_from(["", ".gz", ".zst"]),
)
def test_streamed_readers_match_whole_file_reading_on_any_bytes(tmp_path, pieces, max_row_bytes, comp):
    data = b"".join(pieces)
    for suffix, stream, whole in ((".jsonl", read_jsonl, whole_jsonl), (".csv", read_csv, whole_csv)):
        path = tmp_path / f"any{suffix}{comp}"
        path.write_bytes(compressed(data, comp))
        assert outcome(stream, path, "f", max_row_bytes) == outcome(whole, data, path, "f", max_row_bytes)


def test_a_line_longer_than_the_read_chunks_is_rejected_with_its_length(tmp_path):
    long_line = b'{"a": "' + b"x" * 3_000_000 + b'"}\n'
    blank_long_line = b" " * 2_500_000 + b"\n"
    data = long_line + blank_long_line + b'{"b": 2}'
    path = tmp_path / "long.jsonl.gz"
    path.write_bytes(gzip.compress(data))
    records = list(read_jsonl(path, "long", max_row_bytes=1_000))
    assert records == whole_jsonl(data, path, "long", 1_000)
    assert [r.origin for r in records] == ["long#line1", "long#line3"]
    assert records[0].error == f"row too large: {len(long_line):,} bytes, over data.max_row_bytes=1,000"


def test_a_csv_utf8_error_is_placed_in_the_whole_file(tmp_path):
    data = BOM + b"prompt,completion\n" + b"a,b\n" * 400_000 + b"caf\xe9,x\n"
    path = tmp_path / "late.csv"
    path.write_bytes(data)
    with pytest.raises(DataError) as streamed:
        list(read_csv(path, "late"))
    with pytest.raises(DataError) as whole:
        whole_csv(data, path, "late", 4_000_000)
    assert str(streamed.value) == str(whole.value)


def python_bytes(value) -> int:
    """The independent count: bytes of every text and binary value, 8 per number, 1 per bool, 0 per null."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, bool):
        return 1
    if isinstance(value, (int, float)):
        return 8
    if isinstance(value, dict):
        return sum(python_bytes(v) for v in value.values())
    return sum(python_bytes(v) for v in value)


def test_arrow_row_bytes_match_the_python_count_on_nested_and_sliced_batches():
    rows = [
        {
            "messages": [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": None}],
            "id": 7,
            "tags": ["a", "bb"],
            "ok": True,
            "blob": b"\x00\x01",
        },
        {"messages": None, "id": None, "tags": [], "ok": None, "blob": None},
        {"messages": [{"role": "user", "content": "ü" * 50}], "id": 2, "tags": None, "ok": False, "blob": b""},
    ]
    table = pa.Table.from_pylist(rows * 3)
    for batch in [
        *table.to_batches(),
        table.slice(2, 5).combine_chunks().to_batches()[0],
        table.to_batches()[0].slice(4, 4),
    ]:
        assert row_bytes(batch).tolist() == [python_bytes(r) for r in batch.to_pylist()]


def test_parquet_rows_over_the_limit_are_rejected_and_the_rest_read_by_batches(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": "c" * (300 if i % 700 == 3 else 5)} for i in range(2_500)]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=900)
    records = list(read_parquet(path, "rows", max_row_bytes=200))
    too_large = [r.row for r in records if r.error]
    assert too_large == [i + 1 for i, row in enumerate(rows) if python_bytes(row) > 200]
    assert [r.fields for r in records if not r.error] == [row for row in rows if python_bytes(row) <= 200]
    assert [r.origin for r in records[:2]] == ["rows#1", "rows#2"]


def test_hub_rows_are_checked_against_the_row_limit_like_local_files(tmp_path):
    import datasets

    rows = [{"prompt": "p", "completion": "c" * n} for n in (5, 500, 6)]
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = SourceConfig(name="local", hub=str(folder))
    records = list(read_hub(source, max_row_bytes=100))
    python_rows = list(datasets.load_dataset(str(folder), split="train"))  # the reference: rows through Python
    assert [r.fields for r in records] == [python_rows[0], None, python_rows[2]]
    assert records[1].error.startswith("row too large: 501 bytes of values")
    assert [r.origin for r in records] == [f"{folder}[train]#{i}" for i in (1, 2, 3)]


def test_the_reason_tally_words_top_reasons_as_the_full_list_does():
    reasons = [
        "row too large: 5 bytes",
        "malformed JSON: x",
        "row is a list",
        "malformed JSON: y",
        "not valid UTF-8 (z)",
        "malformed JSON: w",
        "row too large: 9 bytes",
    ] * 3
    kinds = [ingest_kind(r) for r in reasons]
    by_count = sorted(dict.fromkeys(kinds), key=lambda k: -kinds.count(k))[:3]  # stable: first seen wins a tie
    first = {k: next(r for r in reasons if ingest_kind(r) == k) for k in by_count}
    expected = "; ".join(f"{kinds.count(k)} x {first[k]}" for k in by_count)
    assert top_reasons(ReasonTally.of(reasons)) == top_reasons(reasons) == expected


def ingest_cfg(tmp_path: Path, sources: list[dict]):
    from sftops.config import Config

    return Config.model_validate(
        {
            "data": {"sources": sources},
            "model": {"base": "unused", "max_length": 128},
            "paths": {"raw": str(tmp_path / "raw"), "curated": str(tmp_path / "curated")},
        }
    )


def test_ingest_writes_every_rejected_row_in_order_and_refuses_an_all_rejected_source_with_its_top_reasons(tmp_path):
    from sftops.jsonio import read_jsonl as read_rows
    from sftops.stages.ingest import run_ingest

    lines = [b'{"prompt": "p", "completion": "c"}', b"[1]", b"{bad", b'"s"', b'{"prompt": "q", "completion": "d"}'] * 40
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines))
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(line for line in lines if not line.startswith(b'{"')))
    mixed, bad = ({"name": name, "path": str(tmp_path / f"{name}.jsonl")} for name in ("mixed", "bad"))
    report = run_ingest(ingest_cfg(tmp_path, [mixed]))
    expected = [
        r for r in whole_jsonl(b"\n".join(lines), tmp_path, str(tmp_path / "mixed.jsonl"), 4_000_000) if r.error
    ]
    written = list(read_rows(tmp_path / "raw" / "rejected.jsonl"))
    assert [(w["origin"], w["row"], w["reason"], w["raw"]) for w in written] == [
        (r.origin, r.row, r.error, r.raw) for r in expected
    ]
    assert report["sources"]["mixed"] == {"read": 200, "kept": 80, "rejected": 120}
    with pytest.raises(DataError) as refused:
        run_ingest(ingest_cfg(tmp_path, [bad]))
    reasons = [r.error for r in whole_jsonl((tmp_path / "bad.jsonl").read_bytes(), tmp_path, "bad", 4_000_000)]
    assert str(refused.value) == f"source 'bad': none of its 120 rows was kept at ingest: {top_reasons(reasons)}"


def test_hub_batches_give_the_dataset_rows_from_cache_files_through_an_indices_mapping_and_in_memory(tmp_path):
    import datasets

    from sftops.data.sources import _hub_batches

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "n": i}) + "\n" for i in range(3000)))
    loaded = datasets.load_dataset(str(tmp_path), split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.cache_files  # the fast path: its Arrow files read as streams
    for ds in (
        loaded,
        loaded.shuffle(seed=0),
        loaded.select(range(10, 2000, 7)),
        loaded.remove_columns("n"),
        datasets.Dataset.from_list(list(loaded)[:50]),
    ):
        assert [row for batch in _hub_batches(ds) for row in batch.to_pylist()] == list(ds)
