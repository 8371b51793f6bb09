"""The format stage in chunks and worker processes gives, byte for byte, what one chunk in one process gives:
curated splits, tokenised cache, rejected rows, stats and data card. Duplicates, caps, weights, fixed splits and
the length policy are decided across the whole set, not per chunk."""

import json
import random
from pathlib import Path

import pytest

from sftops.config import Config
from sftops.data.store import read_split
from sftops.jsonio import read_jsonl
from sftops.stages.format import run_format
from sftops.stages.ingest import run_ingest

WORDS = (
    "alpha beta gamma delta river stone cloud paper green seven quiet table window orange music garden "
    "silver number answer question explain short story about".split()
)


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_sources(folder: Path) -> list[dict]:
    """Rows with exact and near duplicates far apart (other chunks), bad rows, rows over max_length, a source
    fixed to test whose prompts also appear in the main source, and a weighted, capped source."""
    rng = random.Random(7)
    folder.mkdir()
    main = []
    for i in range(150):
        main.append(
            {
                "instruction": f"{sentence(rng, 3, 12)} {i}",
                "input": sentence(rng, 0, 8) if i % 3 else "",
                "output": sentence(rng, 3, 20 if i % 17 else 120),
            }
        )  # every 17th: too long for 128 tokens
    main += [dict(main[i]) for i in (3, 40, 99)]  # exact duplicates, chunks away from their first copy
    for i in (5, 60):  # near duplicates: one word of a long output changed
        near = dict(main[i], output=main[i]["output"] + " " + sentence(rng, 30, 30))
        main[i] = dict(main[i], output=near["output"])
        words = near["output"].split()
        words[-1] = "changed"
        main.append(dict(near, output=" ".join(words)))
    main += [{"instruction": "no output here"}, {"instruction": "", "output": "empty instruction"}]
    rng.shuffle(main)
    (folder / "main.jsonl").write_text("".join(json.dumps(r) + "\n" for r in main) + "[1, 2]\n{broken\n")
    held = [
        {"instruction": main[k]["instruction"], "input": main[k].get("input", ""), "output": "held answer"}
        for k in range(0, 30, 3)
        if "output" in main[k] and main[k]["instruction"]
    ]
    (folder / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    extra = [
        {"prompt": f"extra question {i} {sentence(rng, 2, 6)}", "completion": sentence(rng, 2, 10)} for i in range(60)
    ]
    (folder / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in extra))
    return [
        {"name": "main", "path": str(folder / "main.jsonl")},
        {"name": "held", "path": str(folder / "held.jsonl"), "split_as": "test"},
        {"name": "extra", "path": str(folder / "extra.jsonl"), "weight": 2.5, "max_rows": 45},
    ]


def config(root: Path, sources: list[dict], model: Path, overflow: str, **data) -> Config:
    return Config.model_validate(
        {
            "data": {
                "sources": sources,
                "test_fraction": 0.2,
                "val_fraction": 0.1,
                "overflow": overflow,
                "near_duplicate_threshold": 0.8,
                "contamination_ngram": 3,
                **data,
            },
            "model": {"base": str(model), "max_length": 128},
            "paths": {"raw": str(root / "raw"), "curated": str(root / "curated")},
        }
    )


def formatted(root: Path, sources: list[dict], model: Path, overflow: str, **data) -> tuple[dict, dict[str, bytes]]:
    cfg = config(root, sources, model, overflow, **data)
    run_ingest(cfg)
    stats = run_format(cfg)
    curated = Path(cfg.paths.curated)
    assert not (root / ".curated.chunks").exists()  # pass 1's files are gone
    return stats, {p.relative_to(curated).as_posix(): p.read_bytes() for p in sorted(curated.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("overflow", ["drop", "truncate_prompt"])
def test_chunks_and_workers_give_the_bytes_of_one_chunk_in_one_process(tmp_path, tiny_model, overflow):
    sources = write_sources(tmp_path / "in")
    whole_stats, whole = formatted(tmp_path / "whole", sources, tiny_model, overflow, chunk_rows=100_000, workers=1)
    chunked_stats, chunked = formatted(tmp_path / "chunked", sources, tiny_model, overflow, chunk_rows=7, workers=2)
    assert set(whole) == set(chunked) and {"train.parquet", "tokenized/train/input_ids.bin", "rejected.jsonl"} <= set(
        whole
    )
    # origins name the source file, the same in both runs; everything else must be identical too
    differing = [name for name in whole if whole[name] != chunked[name]]
    assert not differing, differing
    assert whole_stats == chunked_stats
    # what the set-wide decisions did: they are visible in the counts
    assert whole_stats["sources"]["main"]["duplicates"] >= 5  # 3 exact + 2 near, across chunks
    assert whole_stats["sources"]["extra"]["sampled_out"] == 15
    assert whole_stats["sources"]["held"]["kept"] > 0 and whole_stats["contamination"]["test_prompts"] > 0
    if overflow == "drop":
        assert whole_stats["overflow"]["dropped_too_long"] > 0
    else:
        assert whole_stats["overflow"]["truncated"] > 0


def test_a_duplicate_chunks_away_names_its_first_copy_and_a_fixed_prompt_pulls_its_twins_to_test(tmp_path, tiny_model):
    sources = write_sources(tmp_path / "in")
    cfg = config(tmp_path, sources, tiny_model, "drop", chunk_rows=5, workers=2)
    run_ingest(cfg)
    run_format(cfg)
    curated = Path(cfg.paths.curated)
    raw = {r["origin"]: r["fields"] for r in read_jsonl(Path(cfg.paths.raw) / "main.jsonl")}
    exact = [r for r in read_jsonl(curated / "rejected.jsonl") if r.get("kind") == "exact duplicate"]
    assert len(exact) == 3
    for r in exact:
        assert raw[r["origin"]] == raw[r["kept_copy"]] and r["origin"] != r["kept_copy"]
        assert int(r["origin"].rsplit("line", 1)[1]) > int(r["kept_copy"].rsplit("line", 1)[1])
    held_prompts = {
        tuple(m["content"] for m in row["messages"][:-1])
        for row in read_split(curated, "test")
        if row["source"] == "held"
    }
    for split in ("train", "val"):
        assert not [
            row
            for row in read_split(curated, split)
            if tuple(m["content"] for m in row["messages"][:-1]) in held_prompts
        ]
    weighted = [row for row in read_split(curated, "train") if row["source"] == "extra"]
    kept_extra = json.loads((curated / "stats.json").read_text())["sources"]["extra"]
    assert len(weighted) == kept_extra["train_rows"] and len({r["id"] for r in weighted}) < len(weighted)
