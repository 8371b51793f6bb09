"""A corpus of malformed rows, one per kind: each is rejected with its row, source and a clear reason, and
for every source read = rejected + duplicates + dropped + kept."""

import json
import sys
import unicodedata
from pathlib import Path

import pytest

from sftops.config import Config
from sftops.data.rejections import REASON_CHARS, ReasonTally, shortened
from sftops.data.schemas import RowError, is_blank, to_conversation
from sftops.jsonio import read_jsonl
from sftops.stages.format import run_format
from sftops.stages.ingest import run_ingest

GOOD = {"messages": [{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four."}]}


def msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


# (raw JSONL line, kind, a phrase the reason must contain)
BAD_LINES = [
    (b"{not json", "malformed JSON", "malformed JSON"),
    (b'{"prompt": "p", "completion": "\xff\xfe"}', "not valid UTF-8", "not valid UTF-8"),
    (b"[1, 2]", "row not an object", "row is a list, expected an object"),
    (json.dumps({"text": "x"}).encode(), "no known schema", "found keys ['text']"),
    (json.dumps({"messages": "hello"}).encode(), "wrong type", "'messages' is a str, expected a list"),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), "missing field", "message 0 lacks 'content'"),
    (json.dumps({"messages": ["hi", "there"]}).encode(), "message not an object", "message 0 is a str"),
    (json.dumps(msgs(("robot", "x"), ("assistant", "y"))).encode(), "unknown role", "role 'robot'"),
    (
        json.dumps(msgs(("user", "hi"), ("assistant", " \n\t "))).encode(),
        "empty message",
        "message 1 (assistant) is empty",
    ),
    # open-instruct's evaluation file answers one prompt with a lone U+200B: invisible, so empty
    (
        json.dumps(msgs(("user", "hi"), ("assistant", "\u200b\ufeff\u2060"))).encode(),
        "empty message",
        "message 1 (assistant) is empty: nothing visible",
    ),
    (json.dumps(msgs(("user", "\u3164"), ("assistant", "hi"))).encode(), "empty message", "message 0 (user) is empty"),
    # KTO data (LLaMA-Factory's kto_en_demo) and pairs whose sides are whole conversations: never trained as SFT
    (
        json.dumps({**msgs(("user", "a"), ("assistant", "b")), "label": False}).encode(),
        "preference data",
        "keep only the rows labelled true",
    ),
    (
        json.dumps(
            {"chosen_messages": msgs(("user", "a"), ("assistant", "b"))["messages"], "rejected_messages": []}
        ).encode(),
        "preference data",
        "fields: {messages: chosen_messages}",
    ),
    (json.dumps({"messages": []}).encode(), "empty conversation", "empty conversation"),
    (
        json.dumps(msgs(("user", "hi"), ("assistant", "yo"), ("user", "and?"))).encode(),
        "no final assistant turn",
        "ends with a non-assistant turn",
    ),
    (json.dumps(msgs(("system", "be nice"), ("assistant", "hello"))).encode(), "no user turn", "no user turn"),
    (
        json.dumps(
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}
        ).encode(),
        "invalid weight",
        "weight 2, expected 0 or 1",
    ),
    (
        json.dumps(
            {"messages": [{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}]}
        ).encode(),
        "weight on a non-assistant turn",
        "message 0 (user) has a weight",
    ),
    (
        json.dumps(
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}
        ).encode(),
        "no trainable turn",
        "every assistant turn has weight 0",
    ),
    (
        json.dumps(
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": "x"}]}
        ).encode(),
        "invalid tool call",
        "'tool_calls' is not a non-empty list",
    ),
    (
        json.dumps(msgs(("user", "a"), ("tool", "42"), ("assistant", "b"))).encode(),
        "tool result without a call",
        "does not follow an assistant tool call",
    ),
    (
        json.dumps(msgs(("user", "a"), ("system", "late"), ("assistant", "b"))).encode(),
        "system turn not first",
        "message 1 is a system turn",
    ),
    (
        json.dumps(msgs(("user", "a\u0000b"), ("assistant", "c"))).encode(),
        "invalid characters",
        "control character U+0000",
    ),
    (b'{"prompt": "lone \\ud800 surrogate", "completion": "x"}', "invalid Unicode", "lone surrogate"),
    (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                    {"role": "assistant", "content": "b"},
                ]
            }
        ).encode(),
        "multimodal row",
        "parts of type ['image_url']",
    ),
    (json.dumps({**GOOD, "tools": "get_weather"}).encode(), "invalid tools", "'tools' is text but not JSON"),
    (json.dumps({**GOOD, "tools": {"name": "f"}}).encode(), "invalid tools", "'tools' is not a list"),
    (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"type": "function", "function": {"name": "w", "arguments": json.dumps('{"city": "x"}')}}
                        ],
                    },
                    {"role": "tool", "content": "sun"},
                    {"role": "assistant", "content": "sunny"},
                ]
            }
        ).encode(),
        "invalid tool call",
        "JSON encoded twice (a string holding a JSON string); decode them once",
    ),
    # glaive tool data as LLaMA-Factory ships it (glaive_toolcall_en_demo.json)
    (
        json.dumps(
            {
                "conversations": [
                    {"from": "human", "value": "area of a 5 by 3 rectangle?"},
                    {
                        "from": "function_call",
                        "value": '{"name": "calculate_area", "arguments": {"shape": "rectangle"}}',
                    },
                    {"from": "observation", "value": '{"area": 15}'},
                    {"from": "gpt", "value": "15 square units."},
                ],
                "tools": '[{"name": "calculate_area"}]',
            }
        ).encode(),
        "unsupported tool format",
        "convert the rows to OpenAI messages",
    ),
    # the mapping hint names what the keys mean
    (json.dumps({"text": "a whole web page"}).encode(), "no known schema", "'text' holds pre-training text"),
    (
        json.dumps({"prompt": "p?", "completions": [{"model": "m", "completion": "c"}]}).encode(),
        "no known schema",
        "fields: {prompt: prompt, completion: completions[0].completion}",
    ),
    (
        json.dumps({"instruction": "i", "instances": [{"input": "x", "output": "y"}]}).encode(),
        "no known schema",
        "schema: alpaca, fields: {input: instances[0].input, output: instances[0].output}",
    ),
    (
        json.dumps({"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]}).encode(),
        "unknown role",
        "from 'alien'",
    ),
    (
        json.dumps({"conversations": [{"from": "human"}, {"from": "gpt", "value": "y"}]}).encode(),
        "missing field",
        "turn 0 lacks 'from' or 'value'",
    ),
    (json.dumps({"prompt": 3, "completion": "x"}).encode(), "wrong type", "'prompt' is a int, expected text"),
    (json.dumps({"instruction": ["a"], "output": "x"}).encode(), "wrong type", "'instruction' is a list"),
    (json.dumps(GOOD).encode(), "exact duplicate", "exact duplicate of"),
    (
        json.dumps(msgs(("user", "What is two plus two"), ("assistant", "Four"))).encode(),
        "exact duplicate",
        "exact duplicate of",
    ),
    (
        json.dumps(msgs(("user", "hello " + "word " * 300), ("assistant", "long"))).encode(),
        "too long",
        "tokens > model.max_length 64",
    ),
]


def test_every_malformed_row_is_rejected_with_its_reason_and_counts_are_conserved(tmp_path, tiny_model):
    lines = [json.dumps(GOOD).encode()] + [line for line, _, _ in BAD_LINES]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "bad.csv").write_text("prompt,completion\nfine prompt,fine answer\nthree,fields,here\n")
    (tmp_path / "mapped.jsonl").write_text(
        json.dumps({"q": "x", "instances": []}) + "\n" + json.dumps({"q": "y", "instances": [{"out": "z"}]}) + "\n"
    )
    cfg = Config.model_validate(
        {
            "data": {
                "sources": [
                    {"name": "bad", "path": str(tmp_path / "bad.jsonl")},
                    {"name": "csv", "path": str(tmp_path / "bad.csv")},
                    {
                        "name": "mapped",
                        "path": str(tmp_path / "mapped.jsonl"),
                        "schema": "prompt_completion",
                        "fields": {"prompt": "q", "completion": "instances[0].out"},
                    },
                ],
                "min_test_rows": 0,
            },
            "model": {"base": str(tiny_model), "max_length": 64},
            "paths": {"raw": str(tmp_path / "raw"), "curated": str(tmp_path / "curated")},
        }
    )
    run_ingest(cfg)
    stats = run_format(cfg)
    rejected = list(read_jsonl(Path(cfg.paths.curated) / "rejected.jsonl"))
    by_line = {r["origin"].rsplit("#line", 1)[1]: r for r in rejected if r["source"] == "bad"}
    for n, (_, kind, phrase) in enumerate(BAD_LINES, start=2):
        assert by_line[str(n)]["kind"] == kind, (n, by_line[str(n)])
        assert phrase in by_line[str(n)]["reason"], (n, by_line[str(n)]["reason"])
    csv_rej = [r for r in rejected if r["source"] == "csv"]
    assert [(r["kind"], r["origin"].endswith("bad.csv#line3")) for r in csv_rej] == [
        ("wrong number of CSV fields", True)
    ]
    mapped = [r for r in rejected if r["source"] == "mapped"]
    assert [r["kind"] for r in mapped] == ["mapped field missing"] and "'instances[0].out'" in mapped[0]["reason"]
    duplicates = [r for r in rejected if r["kind"] == "exact duplicate"]
    assert all(r["kept_copy"].endswith("bad.jsonl#line1") for r in duplicates)

    kinds = {kind for _, kind, _ in BAD_LINES} | {"wrong number of CSV fields", "mapped field missing"}
    assert len(kinds - {"exact duplicate", "too long"}) >= 20
    assert stats["rejected_by_reason"] == {
        k: sum(r["kind"] == k for r in rejected) for k in stats["rejected_by_reason"]
    }
    expected = {"bad": (len(lines), 1), "csv": (2, 1), "mapped": (2, 1)}
    for name, (read, kept) in expected.items():
        s = stats["sources"][name]
        assert (s["read"], s["kept"]) == (read, kept)
        assert (
            s["read"]
            == s["rejected_ingest"]
            + s["rejected_format"]
            + s["duplicates"]
            + s["sampled_out"]
            + s["dropped_tokens"]
            + s["kept"]
        )
        assert s["read"] - s["kept"] == sum(r["source"] == name for r in rejected)


def test_tools_given_as_json_text_are_read_and_an_empty_list_is_none():
    row = {**GOOD, "tools": json.dumps([{"type": "function", "function": {"name": "f"}}])}
    assert to_conversation(row)["tools"] == [{"type": "function", "function": {"name": "f"}}]
    assert to_conversation({**GOOD, "tools": "[]"})["tools"] is None


def test_a_stop_message_keeps_its_fix_however_many_keys_the_rows_have():
    wide = {f"column_{i:03d}": "x" for i in range(200)}
    with pytest.raises(RowError) as err:
        to_conversation(wide)
    tally = ReasonTally.of([str(err.value)] * 3)
    assert "... 188 more]" in tally.first["no known schema"]
    assert tally.first["no known schema"].endswith("completion: <the key of the answer>}")
    long = "x" * 1000 + " fix: do this"
    assert shortened(long).endswith(" fix: do this") and len(shortened(long)) == REASON_CHARS


def test_every_unicode_format_character_counts_as_invisible():
    """schemas lists the format characters (Cf) by range, for one fast regex: every one this Python's Unicode
    database knows is in it, and a visible character is not."""
    format_characters = [c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"]
    assert len(format_characters) > 150
    assert all(is_blank(chr(c)) for c in format_characters)
    assert is_blank(" \u200b\n\ufeff\u2060\u3164\u115f\u1160\uffa0\t") and is_blank("")
    assert not is_blank("\u200bok") and not is_blank("\u00a0.")
