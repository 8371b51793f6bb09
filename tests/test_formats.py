"""Every input format and schema, from real files written here (compressed too), through ingest and format
to the curated Parquet splits; the OpenAI weight and tools; a separate validation file; field mapping on the
shared self-instruct data; mixing with weights and caps, each row keeping its source."""

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import data_config, reference_encode
from sftops.config import Config, ModelConfig
from sftops.data.examples import training_examples
from sftops.data.schemas import apply_mapping, to_conversation
from sftops.data.store import read_split
from sftops.encoded import IGNORE
from sftops.errors import DataError
from sftops.modeling import load_tokenizer
from sftops.stages.format import run_format
from sftops.stages.ingest import run_ingest

SHARED = Path(__file__).resolve().parents[2] / "shared"

TOOLS_TEMPLATE = (
    "{% if tools %}{{ 'Tools: ' + (tools | map(attribute='function') | map(attribute='name') | join(',')) + '\n' }}"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ 'A:\n' + m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}{{ '<call>' + c['function']['name'] + '</call>' }}{% endfor %}"
    "{{ eos_token + '\n' }}"
    "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A:\n' }}{% endif %}"
)


def conv(*turns: str) -> list[dict]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def make_cfg(tmp_path: Path, model: Path, sources: list[dict], **data) -> Config:
    return data_config(tmp_path, sources, model, **{"test_fraction": 0.2, "val_fraction": 0.1, **data})


def curated_rows(cfg: Config) -> list[dict]:
    return [r for s in ("train", "val", "test") for r in read_split(cfg.paths.curated, s)]


def run(cfg: Config) -> dict:
    run_ingest(cfg)
    return run_format(cfg)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    (d / "folder").mkdir(parents=True)
    alpaca = [{"instruction": f"say {i}", "input": "loudly" if i % 2 else "", "output": f"{i}!"} for i in range(6)]
    (d / "alpaca.jsonl.gz").write_bytes(gzip.compress("\n".join(json.dumps(r) for r in alpaca).encode()))
    csv_text = "prompt,completion\n" + "".join(f"capital of country {i}?,city number {i}\n" for i in range(5))
    (d / "pc.csv.zst").write_bytes(zstandard.ZstdCompressor().compress(csv_text.encode()))
    chats = [
        {"messages": [{"role": "system", "content": "be brief"}, *conv(f"hello {i}", "hi", "how are you", f"fine {i}")]}
        for i in range(4)
    ]
    (d / "chat.json").write_text(json.dumps(chats))
    sharegpt = [
        [{"from": "human", "value": f"sg question {i}"}, {"from": "gpt", "value": f"sg answer {i}"}] for i in range(4)
    ]
    pq.write_table(pa.table({"conversations": sharegpt}), d / "sharegpt.parquet")
    for i in range(3):
        (d / "folder" / f"part{i}.jsonl").write_text(json.dumps({"question": f"folder q{i}", "answer": f"a{i}"}) + "\n")
    trl = [
        {"prompt": conv(f"trl prompt {i}"), "completion": [{"role": "assistant", "content": f"trl answer {i}"}]}
        for i in range(3)
    ]
    (d / "trl.jsonl").write_text("\n".join(json.dumps(r) for r in trl) + "\n")
    return d


def test_every_format_and_schema_reaches_the_curated_splits(tmp_path, tiny_model, corpus):
    sources = [
        {"name": "alpaca", "path": str(corpus / "alpaca.jsonl.gz")},
        {"name": "pc", "path": str(corpus / "pc.csv.zst")},
        {"name": "chat", "path": str(corpus / "chat.json"), "schema": "messages"},
        {"name": "sharegpt", "path": str(corpus / "sharegpt.parquet")},
        {"name": "folder", "path": str(corpus / "folder")},
        {"name": "glob", "path": str(corpus / "folder" / "part[01].jsonl")},
        {"name": "trl", "path": str(corpus / "trl.jsonl"), "schema": "prompt_completion"},
    ]
    cfg = make_cfg(tmp_path, tiny_model, sources)
    stats = run(cfg)
    rows = curated_rows(cfg)
    by_source: dict[str, list[dict]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    # the glob's two files are exact duplicates of the folder's first two: the first copy (folder) is kept
    assert {k: len(v) for k, v in by_source.items()} == {
        "alpaca": 6,
        "pc": 5,
        "chat": 4,
        "sharegpt": 4,
        "folder": 3,
        "trl": 3,
    }
    assert stats["sources"]["glob"]["duplicates"] == 2
    texts = {r["messages"][-2]["content"]: r["messages"] for r in rows}
    assert texts["say 1\n\nloudly"][-1] == {"role": "assistant", "content": "1!"}
    assert texts["capital of country 3?"][-1]["content"] == "city number 3"
    assert texts["sg question 2"] == conv("sg question 2", "sg answer 2")
    assert texts["trl prompt 1"] == conv("trl prompt 1", "trl answer 1")
    multi = texts["how are you"]
    assert [m["role"] for m in multi] == ["system", "user", "assistant", "user", "assistant"]
    for name, s in stats["sources"].items():
        assert (
            s["read"]
            == s["rejected_ingest"]
            + s["rejected_format"]
            + s["duplicates"]
            + s["sampled_out"]
            + s["dropped_tokens"]
            + s["kept"]
        ), name


def test_openai_weight_zero_turns_are_context_not_targets(tmp_path, tiny_model):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"hello {i}"},
                {"role": "assistant", "content": "the cat sat", "weight": 0},
                {"role": "user", "content": "and then"},
                {"role": "assistant", "content": f"the dog ran {i}", "weight": 1},
            ]
        }
        for i in range(5)
    ]
    (tmp_path / "ft.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = make_cfg(
        tmp_path,
        tiny_model,
        [{"name": "ft", "path": str(tmp_path / "ft.jsonl"), "schema": "openai"}],
        test_fraction=0.01,
        val_fraction=0.0,
        min_test_rows=0,
    )
    run(cfg)
    tok = load_tokenizer(cfg.model)
    curated = curated_rows(cfg)
    examples, _, counts = training_examples(cfg, tok, "train", read_split(cfg.paths.curated, "train"))
    assert counts["from_cache"] and len(examples) == len(read_split(cfg.paths.curated, "train")) > 0
    for row, ex in zip(read_split(cfg.paths.curated, "train"), examples):
        supervised = tok.decode([t for t in ex.labels if t != IGNORE])
        assert supervised == row["messages"][-1]["content"] + tok.eos_token + "\n"
        assert reference_encode(tok, row["messages"]).labels == ex.labels  # the independent encoding agrees
    assert all(r["messages"][2]["weight"] == 0 for r in curated)


def test_tools_render_where_the_template_can_and_fail_clearly_where_it_cannot(tmp_path, tiny_model):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    rows = [
        {
            "tools": tools,
            "messages": [
                {"role": "user", "content": f"weather in town {i}?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
                },
                {"role": "tool", "content": "sunny", "tool_call_id": "1"},
                {"role": "assistant", "content": f"it is sunny in town {i}"},
            ],
        }
        for i in range(4)
    ]
    (tmp_path / "tools.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sources = [{"name": "tools", "path": str(tmp_path / "tools.jsonl")}]
    cfg = make_cfg(tmp_path, tiny_model, sources)
    run_ingest(cfg)
    with pytest.raises(DataError, match="does not render tools/tool calls"):
        run_format(cfg)

    model = tmp_path / "tool-model"
    tok = load_tokenizer(ModelConfig(base=str(tiny_model)))
    tok.chat_template = TOOLS_TEMPLATE
    tok.save_pretrained(model)
    for f in Path(tiny_model).iterdir():
        if not (model / f.name).exists():
            (model / f.name).write_bytes(f.read_bytes())
    cfg = make_cfg(tmp_path, model, sources, min_test_rows=0)  # 4 rows: the split has no test row
    stats = run(cfg)
    assert stats["kept"] == 4
    row = curated_rows(cfg)[0]
    assert row["tools"] == tools and row["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
    tok = load_tokenizer(cfg.model)
    examples, _, _ = training_examples(cfg, tok, row["split"], [row])
    supervised = tok.decode([t for t in examples[0].labels if t != IGNORE])
    assert "<call>get_weather</call>" in supervised and row["messages"][-1]["content"] in supervised


def test_a_validation_file_is_the_val_split_and_pulls_its_prompts_along(tmp_path, tiny_model):
    main = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(40)]
    val = [{"prompt": f"question {i}", "completion": f"another answer {i}"} for i in range(5)]
    (tmp_path / "main.jsonl").write_text("\n".join(json.dumps(r) for r in main) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(r) for r in val) + "\n")
    cfg = make_cfg(
        tmp_path,
        tiny_model,
        [
            {"name": "main", "path": str(tmp_path / "main.jsonl")},
            {"name": "myval", "path": str(tmp_path / "val.jsonl"), "split_as": "val"},
        ],
        val_fraction=0.0,
        near_duplicate_threshold=None,
    )
    run(cfg)
    val_rows = read_split(cfg.paths.curated, "val")
    assert {r["source"] for r in val_rows} == {"main", "myval"}
    assert sum(r["source"] == "myval" for r in val_rows) == 5
    # the main file's rows with a validation prompt follow it, so no prompt is in two splits
    assert {r["messages"][0]["content"] for r in val_rows} == {f"question {i}" for i in range(5)}
    prompts = {
        s: {r["messages"][0]["content"] for r in read_split(cfg.paths.curated, s)} for s in ("train", "val", "test")
    }
    assert (
        not (prompts["train"] & prompts["val"])
        and not (prompts["train"] & prompts["test"])
        and not (prompts["val"] & prompts["test"])
    )


def test_field_mapping_reads_self_instruct_nested_instances(tmp_path, tiny_model):
    seed = SHARED / "data" / "self-instruct-seed" / "seed_tasks.jsonl"
    if not seed.exists():
        pytest.skip(f"self-instruct data not found at {seed} (../shared is absent)")
    fields = {"instruction": "instruction", "input": "instances[0].input", "output": "instances[0].output"}
    cfg = make_cfg(
        tmp_path,
        tiny_model,
        [{"name": "si", "path": str(seed), "schema": "alpaca", "fields": fields}],
        near_duplicate_threshold=None,
    )
    cfg.model.max_length = 4096
    stats = run(cfg)
    raw = [json.loads(line) for line in seed.read_text().splitlines()]
    expected = {}
    for r in raw:
        extra = r["instances"][0]["input"]
        expected[f"{r['instruction']}\n\n{extra}" if extra.strip() else r["instruction"]] = r["instances"][0]["output"]
    rows = curated_rows(cfg)
    assert stats["sources"]["si"]["read"] == len(raw) == 175
    assert len(rows) == stats["kept"] > 150
    for r in rows:
        assert expected[r["messages"][0]["content"]] == r["messages"][1]["content"]


def test_a_mapping_moves_a_field_and_a_passage_is_joined_once():
    dolly = {"instruction": "When?", "context": "In 2000.", "response": "2000", "category": "closed_qa"}
    moved = apply_mapping(dolly, {"input": "context", "output": "response"})
    assert moved == {"instruction": "When?", "input": "In 2000.", "output": "2000", "category": "closed_qa"}
    assert to_conversation(dolly, "alpaca", {"input": "context", "output": "response"})["messages"][0] == {
        "role": "user",
        "content": "When?\n\nIn 2000.",
    }
    # a swap reads both values before either key is dropped; a key that is itself a target stays
    assert apply_mapping({"prompt": "a", "completion": "q"}, {"prompt": "completion", "completion": "prompt"}) == {
        "prompt": "q",
        "completion": "a",
    }
    # the same passage under both input and context (an export that copied it) is joined once
    both = {"instruction": "When?", "input": "In 2000.", "context": "In 2000.", "output": "2000"}
    assert to_conversation(both)["messages"][0]["content"] == "When?\n\nIn 2000."


def test_mixing_weights_and_caps_keep_each_rows_source(tmp_path, tiny_model):
    for name in ("a", "b", "c"):
        rows = [{"prompt": f"source {name} prompt {i}", "completion": f"reply {i}"} for i in range(50)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = make_cfg(
        tmp_path,
        tiny_model,
        [
            {"name": "a", "path": str(tmp_path / "a.jsonl"), "weight": 2},
            {"name": "b", "path": str(tmp_path / "b.jsonl"), "weight": 0.5},
            {"name": "c", "path": str(tmp_path / "c.jsonl"), "max_rows": 20},
        ],
        near_duplicate_threshold=None,
    )
    stats = run(cfg)
    train = read_split(cfg.paths.curated, "train")
    unique_a = len({r["id"] for r in train if r["source"] == "a"})
    held_out_b = sum(r["source"] == "b" for s in ("val", "test") for r in read_split(cfg.paths.curated, s))
    assert sum(r["source"] == "a" for r in train) == 2 * unique_a == stats["sources"]["a"]["train_rows"]
    assert (
        stats["sources"]["b"]["train_rows"] == sum(r["source"] == "b" for r in train) == round(0.5 * (50 - held_out_b))
    )
    assert stats["sources"]["c"]["kept"] == 20 and stats["sources"]["c"]["sampled_out"] == 30
    assert {r["source"] for r in train} == {"a", "b", "c"}
