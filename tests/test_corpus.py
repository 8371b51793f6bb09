"""The data users actually have (tests/corpus, provenance in tests/corpus/PROVENANCE.md; GSM8K and self-instruct
from ../shared): every sample through the real ingest and format stages with its expected outcome. A kept
sample keeps what its rows mean (context passages, system turns, value parts); a refused one stops with exit
code 2 and one line naming the source, the reason with its count and the fix, never a traceback."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import data_config, error_lines, sftops
from sftops.config import Config
from sftops.data.examples import split_cache
from sftops.data.store import read_split
from sftops.encoded import IGNORE
from sftops.errors import DataError
from sftops.modeling import load_tokenizer
from sftops.stages.format import run_format
from sftops.stages.ingest import run_ingest

CORPUS = Path(__file__).parent / "corpus"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# name: (source settings, expected: ("kept", rows kept) or ("refused", phrase of the one line))
KEPT = {
    "alpaca": ({"path": "llamafactory_alpaca_en_demo.json"}, 8),
    "openai": ({"path": "openai_toy_chat_fine_tuning.jsonl"}, 3),  # row 4 has no user turn: rejected with its reason
    "dolly": ({"path": "dolly_15k_head.jsonl"}, 4),
    # the mapping the docs show for Dolly under the alpaca schema: `context` moves to `input`, joined once
    "dolly_mapped": (
        {"path": "dolly_15k_head.jsonl", "schema": "alpaca", "fields": {"input": "context", "output": "response"}},
        4,
    ),
    "csv": ({"path": "prompt_response.csv"}, 3),
    "tsv": ({"path": "prompt_response.tsv"}, 3),
    "variants": ({"path": "value_parts_developer_role.jsonl"}, 3),
    # open-instruct's evaluation instances: a list of completions, the first read; one of them is a lone U+200B,
    # invisible, so rejected as empty
    "openinstruct": (
        {
            "path": "open_instruct_eval_instances.jsonl",
            "schema": "prompt_completion",
            "fields": {"completion": "completions[0].completion"},
            "ignore": ["id"],
        },
        2,
    ),
    "gsm8k": ({"path": str(SHARED / "gsm8k" / "train.jsonl"), "max_rows": 30}, 30),
    "selfinstruct": (
        {
            "path": str(SHARED / "self-instruct-seed" / "seed_tasks.jsonl"),
            "schema": "alpaca",
            "max_rows": 20,
            "fields": {"input": "instances[0].input", "output": "instances[0].output"},
        },
        20,
    ),
}
REFUSED = {
    "mllm": ({"path": "llamafactory_mllm_demo.json"}, "multimodal row"),
    "llava": ({"path": "llava_instruct_style.json"}, "multimodal row"),
    "placeholder": ({"path": "sharegpt_image_placeholder.jsonl"}, "multimodal row"),
    "parquetparts": ({"path": "image_parts.parquet"}, "multimodal row"),
    "dpo": ({"path": "llamafactory_dpo_style.json"}, "preference data"),
    "kto": ({"path": "llamafactory_kto_en_demo.json"}, "preference data"),
    "glaive": ({"path": "llamafactory_glaive_toolcall_en_demo.json"}, "convert the rows to OpenAI messages"),
    "jsonlines": ({"path": "dolly_to_json_lines.json"}, "holds JSON Lines"),
    "completions": ({"path": "open_instruct_eval_instances.jsonl"}, "completion: completions[0].completion"),
    "dpomessages": ({"path": "chosen_rejected_messages.jsonl"}, "preference data"),
    "strings": ({"path": "bare_strings.json"}, "row is a str, expected an object"),
    "tiny": ({"path": "tiny.jsonl"}, "split train/val/test"),
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """The corpus files, plus the two samples written here: image content parts in Parquet, and a 3-row source."""
    d = tmp_path / "corpus"
    d.mkdir()
    for f in CORPUS.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    # a Hugging Face Parquet export of a multimodal chat set: nested content parts, an image part in each user turn
    mllm = json.loads((CORPUS / "llamafactory_mllm_demo.json").read_text())
    rows = [
        {
            "messages": [
                {
                    "role": m["role"],
                    "content": ([{"type": "image", "text": None}] if m["role"] == "user" else [])
                    + [{"type": "text", "text": m["content"]}],
                }
                for m in r["messages"]
            ]
        }
        for r in mllm
    ]
    pq.write_table(pa.Table.from_pylist(rows), d / "image_parts.parquet")
    alpaca = json.loads((CORPUS / "llamafactory_alpaca_en_demo.json").read_text())[:3]
    (d / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    return d


def make_cfg(
    tmp_path: Path, model: Path, name: str, source: dict, corpus: Path, max_length: int = 16384, **data
) -> Config:
    path = source["path"] if Path(source["path"]).is_absolute() else str(corpus / source["path"])
    sources = [{"name": name, **source, "path": path}]
    # max_length: the tiny tokenizer takes about one token a character
    return data_config(
        tmp_path / name, sources, model, max_length, **{"val_fraction": 0.0, "test_fraction": 0.2, **data}
    )


def curated(cfg: Config) -> list[dict]:
    return [r for s in ("train", "val", "test") for r in read_split(cfg.paths.curated, s)]


def trained(cfg: Config) -> list[tuple[str, str]]:
    """What training sees, from the format stage's token cache: each row's decoded input ids and its decoded
    targets (the labels that are not IGNORE), not the Parquet text."""
    tokenizer = load_tokenizer(cfg.model)
    rows = [e for s in ("train", "val", "test") for e in split_cache(cfg, tokenizer, s)]
    return [(tokenizer.decode(e.input_ids), tokenizer.decode([t for t in e.labels if t != IGNORE])) for e in rows]


@pytest.mark.reliability
def test_every_kept_sample_becomes_conversations_that_keep_their_meaning(tmp_path, tiny_model, corpus, figures):
    found, seen = {}, {}
    for name, (source, expected) in KEPT.items():
        if name in ("gsm8k", "selfinstruct") and not SHARED.is_dir():
            continue
        cfg = make_cfg(tmp_path, tiny_model, name, source, corpus, min_test_rows=0)
        run_ingest(cfg)
        stats = run_format(cfg)
        assert stats["kept"] == expected, (name, stats["rejected_by_reason"])
        found[name] = (stats, {r["messages"][-1]["content"]: r["messages"] for r in curated(cfg)})
        seen[name] = trained(cfg)
        figures["data samples tried"] += 1
        figures["data samples right"] += 1
    stats, rows = found["dolly"]
    closed_book = rows[
        "Virgin Australia commenced services on 31 August 2000 as Virgin Blue, with two aircraft on a single route."
    ]
    assert closed_book[0]["content"].startswith(
        "When did Virgin Australia start operating?\n\nVirgin Australia, the trading name"
    )
    assert stats["unused_fields"] == {"dolly": {"category": 4}}  # reported, not dropped unseen
    passage = "It is the largest airline by fleet size to use the Virgin brand."
    for name in ("dolly", "dolly_mapped"):
        (ids, targets), *_ = [t for t in seen[name] if passage in t[0]]
        assert ids.count(passage) == 1 and ids.count("When did Virgin Australia start operating?") == 1, name
        assert targets.startswith("Virgin Australia commenced services on 31 August 2000"), name
    stats, _ = found["openinstruct"]
    assert stats["rejected_by_reason"] == {"empty message": 1}
    # the first completion of each, with the end of turn the template supervises after it
    assert sorted(t for _, t in seen["openinstruct"]) == [
        "The email belongs to the Social category.</s>\n",
        'puts "Hello World!"</s>\n',
    ]
    stats, rows = found["openai"]
    assert stats["rejected_by_reason"] == {"no user turn": 1}
    assert rows["It's easy to learn!"][0] == {
        "role": "system",
        "content": "You are a happy assistant that puts a positive spin on everything.",
    }
    _, rows = found["variants"]
    assert rows["On 31 August 2000, as Virgin Blue."][:2] == [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "When did Virgin Australia start operating?"},
    ]
    for name in ("csv", "tsv"):
        _, rows = found[name]
        assert rows["Tope"][0] == {"role": "user", "content": "Which is a species of fish? Tope or Rope"}
        assert "three daughters: Amy, Jessy, and what" in "".join(ids for ids, _ in seen[name])
    _, rows = found["alpaca"]
    assert rows["The thought of her displaying such courage brought a smile to my face."][0]["content"] == (
        "Reword this sentence to increase clarity\n\nThe idea of her being so brave made me smile"
    )
    if "selfinstruct" in found:
        assert found["selfinstruct"][0]["unused_fields"] == {
            "selfinstruct": {"id": 175, "is_classification": 175, "name": 175}
        }  # over the rows read


def test_truncate_prompt_cuts_a_long_passage_across_its_paragraphs_and_trains_the_answer_whole(
    tmp_path, tiny_model, corpus
):
    """Dolly's question, a three-paragraph passage, the answer: at 250 tokens (one token a character or so) no
    paragraph alone gives enough, so the passage is cut across them; the answer is trained whole with its end
    of turn. At 130 the answer cannot fit beside the question: the row is dropped as too long, and the source,
    left with none, stops the stage with the setting to raise, also through the CLI."""
    source = {"path": "dolly_three_paragraph_context.jsonl"}
    split = {"min_test_rows": 0, "overflow": "truncate_prompt"}
    cfg = make_cfg(tmp_path, tiny_model, "cut", source, corpus, 250, **split)
    run_ingest(cfg)
    assert run_format(cfg)["kept"] == 1
    [(ids, targets)] = trained(cfg)
    answer = (
        "Virgin Australia commenced services on 31 August 2000 as Virgin Blue, with two aircraft on a single route."
    )
    assert targets == answer + "</s>\n"
    assert "When did Virgin Australia start operating?\n\nVirgin Aus" in ids and " [...] " in ids
    assert "single route.\n### Assistant:" in ids  # the passage's end, then the answer
    cfg = make_cfg(tmp_path, tiny_model, "tight", source, corpus, 130, **split)
    run_ingest(cfg)
    with pytest.raises(DataError, match="too long: .* raise model.max_length"):
        run_format(cfg)
    params = {
        "data": {"sources": [{"name": "tight", "path": str(corpus / source["path"])}], **split},
        "model": {"base": str(tiny_model), "max_length": 130},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert sftops("ingest", cwd=tmp_path).returncode == 0
    done = sftops("format", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert [line for line in error_lines(done.stderr) if "raise model.max_length" in line] != []


def test_a_declared_ignore_silences_the_unused_field_report(tmp_path, tiny_model, corpus):
    cfg = make_cfg(
        tmp_path, tiny_model, "dolly", {"path": "dolly_15k_head.jsonl", "ignore": ["category"]}, corpus, min_test_rows=0
    )
    run_ingest(cfg)
    assert run_format(cfg)["unused_fields"] == {}
    assert "## Fields not used" not in (Path(cfg.paths.curated) / "data_card.md").read_text()


@pytest.mark.reliability
def test_every_refused_sample_stops_the_stage_with_one_line_naming_the_source_reason_and_fix(
    tmp_path, tiny_model, corpus, figures
):
    for name, (source, phrase) in REFUSED.items():
        cfg = make_cfg(tmp_path, tiny_model, name, source, corpus)
        with pytest.raises(DataError) as err:
            run_ingest(cfg)
            run_format(cfg)
        message = str(err.value)
        assert phrase in message and "\n" not in message, (name, message)
        if name not in ("tiny", "jsonlines"):  # the split's refusal; a file unreadable as a whole
            assert f"source {name!r}: none of its" in message
        figures["data samples tried"] += 1
        figures["data samples refused clearly"] += 1


@pytest.mark.reliability
@pytest.mark.parametrize("name", ["strings", "mllm", "dpo", "kto", "tiny"])
def test_the_cli_ends_a_refused_sample_with_exit_code_2_and_one_line(tmp_path, tiny_model, corpus, name, figures):
    source, phrase = REFUSED[name]
    params = {
        "data": {"sources": [{"name": name, "path": str(corpus / source["path"])}]},
        "model": {"base": str(tiny_model), "max_length": 4096},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = sftops("ingest", cwd=tmp_path)
    if done.returncode == 0:
        done = sftops("format", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and phrase in lines[0], lines
    figures["data refusals ending in one line (CLI)"] += 1
