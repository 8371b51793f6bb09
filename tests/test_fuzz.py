"""Fuzzing, with a fixed budget per run: the row readers and the schema mapping take any input (random bytes,
random JSON, random field mappings) and either produce a row / a conversation or say why not; they never raise
anything else, and every line they read is accounted for."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftops.data.schemas import ROLES, SCHEMAS, RowError, to_conversation
from sftops.data.sources import BOM, read_csv, read_jsonl
from sftops.errors import DataError

pytestmark = pytest.mark.reliability
BUDGET = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = [
    "messages",
    "role",
    "content",
    "prompt",
    "completion",
    "conversations",
    "from",
    "value",
    "instruction",
    "input",
    "output",
    "question",
    "answer",
    "conversation",
    "tools",
    "tool_calls",
    "weight",
    "system",
    "name",
    "type",
    "text",
    "function",
    "arguments",
    "tool_call_id",
    "user",
    "assistant",
    "gpt",
    "human",
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(KEYS + list(ROLES))
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=25,
)
rows = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)
paths = st.lists(st.sampled_from(KEYS) | st.integers(0, 2).map(lambda i: f"[{i}]"), min_size=1, max_size=3).map(
    lambda parts: ".".join(parts).replace(".[", "[")
)
lines = st.lists(
    st.binary(max_size=80)
    | json_values.map(lambda v: json.dumps(v).encode())
    | rows.map(lambda r: json.dumps(r).encode()),
    max_size=12,
)


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as name:  # one file rewritten per example (hypothesis reuses the fixture)
        yield Path(name)


def _file(folder: Path, data: bytes, suffix: str) -> Path:
    path = folder / f"fuzz{suffix}"
    path.write_bytes(data)
    return path


@BUDGET
@given(chunks=lines)
def test_the_jsonl_reader_accounts_for_every_line_of_any_bytes(chunks, folder, figures):
    data = b"\n".join(chunks)
    path = _file(folder, data, ".jsonl")
    try:
        records = list(read_jsonl(path, "fuzz.jsonl"))
    except DataError as exc:  # only a file with nothing but whitespace is refused as a whole
        assert not data.strip() and "fuzz.jsonl" in str(exc)
        figures["fuzz examples: row parser"] += 1
        return
    body = data[len(BOM) :] if data.startswith(BOM) else data
    assert len(records) == sum(1 for line in io.BytesIO(body) if line.strip())
    for rec in records:
        assert (rec.fields is None) != (rec.error is None)
        assert rec.fields is None or isinstance(rec.fields, dict)
        assert rec.origin.startswith("fuzz.jsonl#line")
        if rec.fields is not None:
            json.dumps(rec.fields, ensure_ascii=False).encode("utf-8")  # what ingest writes must be writable
    figures["fuzz examples: row parser"] += 1


@BUDGET
@given(text=st.text(max_size=300))
def test_the_csv_reader_reads_or_refuses_any_text(text, folder, figures):
    path = _file(folder, text.encode("utf-8", "surrogatepass"), ".csv")
    try:
        records = list(read_csv(path, "fuzz.csv"))
    except DataError as exc:
        assert "fuzz" in str(exc)
    else:
        assert all((r.fields is None) != (r.error is None) for r in records)
    figures["fuzz examples: row parser"] += 1


@BUDGET
@given(
    fields=rows,
    schema=st.sampled_from(["auto", *SCHEMAS]),
    mapping=st.dictionaries(st.sampled_from(KEYS), paths, max_size=2),
)
def test_the_schema_mapping_gives_a_valid_conversation_or_a_reason(fields, schema, mapping, figures):
    try:
        conv = to_conversation(fields, schema, mapping)
    except RowError as exc:
        assert exc.kind and str(exc).startswith(exc.kind)
    else:
        messages = conv["messages"]
        assert messages and messages[-1]["role"] == "assistant"
        assert all(m["role"] in ROLES and isinstance(m["content"], str) for m in messages)
        assert any(m["role"] == "user" for m in messages)
    figures["fuzz examples: schema mapping"] += 1
