"""ingest and format on real files of every supported kind, including broken ones."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import data_config
from sftops.data.chunks import conversation_and_prompt
from sftops.data.schemas import RowError, to_conversation
from sftops.data.split import split_of
from sftops.data.store import SCHEMA, read_rows, read_split, rows_table
from sftops.jsonio import read_jsonl
from sftops.stages.format import run_format
from sftops.stages.ingest import run_ingest


@pytest.fixture
def files(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_bytes(
        b'{"prompt": "p1", "completion": "c1"}\n'
        b"{not json\n"
        b'["a list"]\n'
        b"\n"
        b'{"prompt": "p2", "completion": "\xff\xfe"}\n'
        b'{"instruction": "i1", "input": "x", "output": "o1"}\n'
    )
    (d / "b.csv").write_text('question,answer\nq1,a1\nq2,a2,extra\n"q3",""\n')
    (d / "c.json").write_text(
        json.dumps([{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]}, 5])
    )
    pq.write_table(pa.table({"prompt": ["pp", "p1"], "completion": ["cc", "c1"]}), d / "d.parquet")
    (d / "e.yml").write_text("categories: [x]\nconversations:\n- - hi\n  - Yes\n- - only a user turn\n- not a list\n")
    return d


def test_ingest_keeps_and_rejects_with_reasons(tmp_path, files):
    cfg = data_config(tmp_path, [{"name": "mixed", "path": str(files)}])
    report = run_ingest(cfg)
    counts = report["sources"]["mixed"]
    # a.jsonl: 5 rows (blank line skipped), 3 bad; b.csv: 3 rows, 1 bad; c.json: 2, 1 bad; d.parquet: 2; e.yml: 3, 1 bad
    assert counts == {"read": 15, "kept": 9, "rejected": 6}
    rejected = list(read_jsonl(Path(cfg.paths.raw) / "rejected.jsonl"))
    reasons = {r["origin"].rsplit("/", 1)[1]: r["reason"] for r in rejected}
    assert reasons["a.jsonl#line2"].startswith("malformed JSON")
    assert reasons["a.jsonl#line3"].startswith("row is a list, expected an object")
    assert reasons["a.jsonl#line5"].startswith("not valid UTF-8")
    assert reasons["b.csv#line3"] == "row has 3 fields, header has 2"
    assert reasons["c.json#2"].startswith("row is a int, expected an object")
    assert reasons["e.yml#3"] == "conversation is not a list of turns"
    # each rejected row says its kind, as the curated copy does
    kinds = {r["origin"].rsplit("/", 1)[1]: r["kind"] for r in rejected}
    assert kinds["a.jsonl#line2"] == "malformed JSON" and kinds["b.csv#line3"] == "wrong number of CSV fields"
    assert kinds["a.jsonl#line3"] == kinds["c.json#2"] == "row not an object"
    kept = list(read_jsonl(Path(cfg.paths.raw) / "mixed.jsonl"))
    assert len(kept) == 9
    # YAML scalars stay text: "Yes" is not turned into a boolean.
    assert {"conversation": ["hi", "Yes"], "categories": ["x"]} in [r["fields"] for r in kept]


def test_format_maps_dedupes_drops_and_splits(tmp_path, files, tiny_model):
    cfg = data_config(
        tmp_path, [{"name": "mixed", "path": str(files)}], tiny_model, test_fraction=0.3, val_fraction=0.2
    )
    run_ingest(cfg)
    stats = run_format(cfg)
    assert stats["read"] == 15 and stats["kept"] + stats["duplicates"] + stats["rejected"] == 15
    # p1/c1 appears in a.jsonl and d.parquet; q3 has an empty answer; one YAML conversation has no response.
    format_reasons = {
        k: v
        for k, v in stats["rejected_by_reason"].items()
        if k in ("exact duplicate", "empty message", "no final assistant turn")
    }
    assert format_reasons == {"exact duplicate": 1, "empty message": 1, "no final assistant turn": 1}
    assert sum(stats["rejected_by_reason"].values()) == 15 - stats["kept"]
    rows = [r for s in ("train", "val", "test") for r in read_split(cfg.paths.curated, s)]
    assert len(rows) == stats["kept"] == 6
    by_prompt = {r["messages"][0]["content"]: r for r in rows}
    assert by_prompt["i1\n\nx"]["messages"][1] == {"role": "assistant", "content": "o1"}
    assert by_prompt["q1"]["messages"][1]["content"] == "a1"


def test_package_source_reads_chatterbot(tmp_path):
    cfg = data_config(tmp_path, [{"name": "cb", "package": "chatterbot_corpus", "path": "data/english/greetings.yml"}])
    report = run_ingest(cfg)
    assert report["sources"]["cb"]["kept"] > 10


def test_hub_source_code_path_on_a_local_dataset_folder(tmp_path):
    # The hub reader is datasets.load_dataset; a local folder goes through the same call offline.
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    cfg = data_config(tmp_path, [{"name": "hubby", "hub": str(folder), "split": "train"}])
    assert run_ingest(cfg)["sources"]["hubby"] == {"read": 2, "kept": 2, "rejected": 0}


def test_missing_source_is_a_clear_error(tmp_path):
    from sftops.errors import DataError

    cfg = data_config(tmp_path, [{"name": "nope", "path": str(tmp_path / "missing.jsonl")}])
    with pytest.raises(DataError, match="nothing matches"):
        run_ingest(cfg)


def test_split_is_deterministic_and_groups_prompts():
    conv = lambda p, r: [{"role": "user", "content": p}, {"role": "assistant", "content": r}]  # noqa: E731
    splits = [split_of(conversation_and_prompt(conv(f"q{i}", "r"))[1], 0, 0.1, 0.2) for i in range(2000)]
    assert splits == [
        split_of(conversation_and_prompt(conv(f"q{i}", "other answer"))[1], 0, 0.1, 0.2) for i in range(2000)
    ]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(share["test"] - 0.2) < 0.03 and abs(share["val"] - 0.1) < 0.03
    assert splits != [split_of(conversation_and_prompt(conv(f"q{i}", "r"))[1], 1, 0.1, 0.2) for i in range(2000)]


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role: message 0 has role 'robot'"),
        ({"prompt": 3, "completion": "x"}, "'prompt' is a int"),
        ({"text": "x"}, "no known schema"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty message"),
    ],
)
def test_row_errors_say_why(fields, reason):
    with pytest.raises(RowError, match=reason):
        to_conversation(fields)


def test_package_rows_are_labelled_independently_of_the_install_location(tmp_path):
    cfg = data_config(tmp_path, [{"name": "cb", "package": "chatterbot_corpus", "path": "data/english/greetings.yml"}])
    run_ingest(cfg)
    first = next(read_jsonl(Path(cfg.paths.raw) / "cb.jsonl"))
    assert first["origin"] == "chatterbot_corpus:data/english/greetings.yml#1"


def test_ingest_progress_ends_on_the_rows_read(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    run_ingest(data_config(tmp_path, [{"name": "two", "path": str(tmp_path / "a.jsonl")}]))
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("ingest two: 2 rows"), last


def test_tsv_json_lines_in_a_json_file_and_a_folder_of_nothing_readable_say_what_they_are(tmp_path):
    from sftops.errors import DataError

    (tmp_path / "t.tsv").write_text("prompt\tcompletion\nTope or Rope, which is a fish?\tTope\n")
    cfg = data_config(tmp_path, [{"name": "tsv", "path": str(tmp_path / "t.tsv")}])
    run_ingest(cfg)
    [row] = read_jsonl(Path(cfg.paths.raw) / "tsv.jsonl")
    assert row["fields"] == {"prompt": "Tope or Rope, which is a fish?", "completion": "Tope"}
    (tmp_path / "lines.json").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    cfg = data_config(tmp_path, [{"name": "lines", "path": str(tmp_path / "lines.json")}])
    with pytest.raises(DataError, match=r"holds JSON Lines .*rename it to \.jsonl"):
        run_ingest(cfg)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not data")
    cfg = data_config(tmp_path, [{"name": "notes", "path": str(tmp_path / "notes")}])
    with pytest.raises(DataError, match=r"holds no file of a readable format; files ending in \.jsonl, .*\.tsv"):
        run_ingest(cfg)


def test_an_empty_validation_split_is_said_in_the_stats_and_the_card(tmp_path, tiny_model):
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"prompt": f"what is {i} plus two?", "completion": f"{i + 2}"}) + "\n" for i in range(6))
    )
    source = [{"name": "few", "path": str(tmp_path / "a.jsonl")}]
    cfg = data_config(tmp_path, source, tiny_model, val_fraction=0.01, test_fraction=0.3)
    run_ingest(cfg)
    stats = run_format(cfg)
    assert stats["splits"]["val"] == 0
    assert stats["warnings"] and "validation split is empty" in stats["warnings"][0]
    assert "data.val_fraction" in (Path(cfg.paths.curated) / "data_card.md").read_text()


def test_a_json_file_of_one_object_is_one_row_and_a_trailing_comma_is_named_on_its_line(tmp_path):
    from sftops.errors import DataError

    (tmp_path / "one.json").write_text(json.dumps({"prompt": "p", "completion": "c"}, indent=2))
    cfg = data_config(tmp_path, [{"name": "one", "path": str(tmp_path / "one.json")}])
    assert run_ingest(cfg)["sources"]["one"] == {"read": 1, "kept": 1, "rejected": 0}
    (tmp_path / "comma.json").write_text(
        '[\n  {"prompt": "p", "completion": "c"},\n  {"prompt": "q", "completion": "d"},\n]\n'
    )
    cfg = data_config(tmp_path, [{"name": "comma", "path": str(tmp_path / "comma.json")}])
    with pytest.raises(DataError, match="a trailing comma at line 3 .*remove it"):
        run_ingest(cfg)


def test_rows_table_holds_what_a_record_per_row_holds_and_reads_back(tmp_path):
    """The curated rows' table, built column by column, against one record dict per row through from_pylist
    (tools, tool calls, weights, names and truncated conversations included), and read back as the rows."""
    calls = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]
    rows = [
        {
            "id": "a1",
            "source": "s",
            "origin": "f:1",
            "split": "train",
            "tools": None,
            "messages": [{"role": "user", "content": "hi é"}, {"role": "assistant", "content": "yo"}],
        },
        {
            "id": "b2",
            "source": "t",
            "origin": "f:2",
            "split": "test",
            "tools": [{"type": "function", "function": {"name": "add"}}],
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "1+1"},
                {"role": "assistant", "content": "", "tool_calls": calls, "weight": 0},
                {"role": "tool", "content": "2", "tool_call_id": "c1", "name": "add"},
                {"role": "assistant", "content": "2", "weight": 1},
            ],
            "messages_as_trained": [{"role": "user", "content": "1"}],
            "prompt_tokens_cut": 3,
            "response_tokens_lost": 1,
        },
    ]

    def record(row):
        return {
            "id": row["id"],
            "source": row["source"],
            "origin": row["origin"],
            "split": row["split"],
            "messages": [
                {
                    "role": m["role"],
                    "content": m["content"],
                    "weight": m.get("weight"),
                    "tool_calls": json.dumps(m["tool_calls"], ensure_ascii=False) if "tool_calls" in m else None,
                    "tool_call_id": m.get("tool_call_id"),
                    "name": m.get("name"),
                }
                for m in row["messages"]
            ],
            "tools": json.dumps(row["tools"], ensure_ascii=False) if row["tools"] else None,
            "messages_as_trained": json.dumps(row["messages_as_trained"]) if "messages_as_trained" in row else None,
            "prompt_tokens_cut": row.get("prompt_tokens_cut", 0),
            "response_tokens_lost": row.get("response_tokens_lost", 0),
        }

    table = rows_table(rows)
    assert table.equals(pa.Table.from_pylist([record(r) for r in rows], schema=SCHEMA))
    assert rows_table(rows, SCHEMA.append(pa.field("extra", pa.int64())), extra=[7, 8]).column("extra").to_pylist() == [
        7,
        8,
    ]
    pq.write_table(table, tmp_path / "rows.parquet")
    back = read_rows(tmp_path / "rows.parquet")
    assert [r["messages"] for r in back] == [r["messages"] for r in rows]
    assert [r["tools"] for r in back] == [r["tools"] for r in rows]
