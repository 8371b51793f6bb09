"""The train stage reads the tokenised cache memory-mapped: the same examples, the same micro-batches (padded and
packed, for every process's share) and the same losses as tokenising afresh into lists, without reading the
conversations; an interrupted cache write is never taken for a valid cache."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import sftops.data.examples as examples_module
from sftops.config import Config, TrainConfig
from sftops.data.batching import micro_batches, step_batches, step_micro_batches
from sftops.data.examples import split_examples
from sftops.data.store import CACHE_KEY, TOKENIZED, TokenCacheWriter, TokenRows, read_cache, read_split, write_cache
from sftops.encoded import IGNORE, Encoded, example_lengths
from sftops.modeling import load_tokenizer
from sftops.stages.format import run_format
from sftops.stages.ingest import run_ingest
from sftops.train.loop import train_loop


@pytest.fixture(scope="module")
def formatted(tmp_path_factory, tiny_model):
    """A curated project with two sources of varied lengths, through the real ingest and format stages."""
    tmp = tmp_path_factory.mktemp("mapped")
    for name, pad in (("short", 1), ("long", 5)):
        rows = [
            {
                "prompt": f"what is {i} plus two?" + " more" * (i % 7) * pad,
                "completion": f"{i + 2}, the cat sat." * (1 + i % 3),
            }
            for i in range(40)
        ]
        (tmp / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = Config.model_validate(
        {
            "data": {
                "sources": [{"name": n, "path": str(tmp / f"{n}.jsonl")} for n in ("short", "long")],
                "overflow": "truncate_prompt",
                "val_fraction": 0.1,
            },
            "model": {"base": str(tiny_model), "max_length": 64},
            "paths": {"raw": str(tmp / "raw"), "curated": str(tmp / "curated")},
        }
    )
    run_ingest(cfg)
    run_format(cfg)
    return cfg, load_tokenizer(cfg.model)


@pytest.fixture(scope="module")
def both_paths(formatted):
    """(memory-mapped, tokenised afresh) train examples of the same split."""
    cfg, tok = formatted
    mapped = split_examples(cfg, tok, "train")
    key = Path(cfg.paths.curated) / TOKENIZED / CACHE_KEY
    saved = key.read_text()
    key.write_text("{}")  # a stale key: the fallback path tokenises the conversations afresh
    try:
        listed = split_examples(cfg, tok, "train")
    finally:
        key.write_text(saved)
    return mapped, listed


def test_the_mapped_cache_gives_the_examples_sources_and_counts_of_tokenising_afresh(both_paths):
    mapped, listed = both_paths
    assert isinstance(mapped.examples, TokenRows) and isinstance(listed.examples, list)
    assert mapped.counts["from_cache"] and not listed.counts["from_cache"]
    assert {**mapped.counts, "from_cache": None} == {**listed.counts, "from_cache": None}
    assert [(e.input_ids, e.labels) for e in mapped.examples] == [(e.input_ids, e.labels) for e in listed.examples]
    assert example_lengths(mapped.examples).tolist() == [len(e.input_ids) for e in listed.examples]
    assert mapped.source_names == listed.source_names == ["long", "short"]
    assert mapped.sources.tolist() == listed.sources.tolist() and len(set(mapped.sources.tolist())) == 2
    expected_targets = [sum(label != IGNORE for label in e.labels[1:]) for e in listed.examples]
    assert mapped.examples.target_counts().tolist() == expected_targets


def test_train_reads_no_conversation_when_the_cache_is_valid(formatted, monkeypatch):
    cfg, tok = formatted

    def refuse(*_):
        raise AssertionError("the conversations were read")

    monkeypatch.setattr(examples_module, "read_split", refuse)
    sample = split_examples(cfg, tok, "train", max_rows=7, seed=3)
    assert sample.counts["from_cache"] and len(sample.examples) == 7
    # max_train_rows draws the rows random.Random(seed).sample draws from the whole split
    rows = read_split(cfg.paths.curated, "train")
    wanted = [r["id"] for r in random.Random(3).sample(rows, 7)]
    assert sample.examples.ids.to_pylist() == wanted


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_process_share_gets_the_same_batches_from_the_mapped_cache(both_paths, packed, world):
    mapped, listed = both_paths
    for rank in range(world):
        streams = [micro_batches(example_lengths(p.examples), 3, 7, group_by_length=True) for p in (mapped, listed)]
        for _ in range(4):
            shares = [step_batches(s, 2, world, rank) for s in streams]
            assert shares[0] == shares[1]
            got = step_micro_batches(mapped.examples, shares[0], 0, packed, mapped.sources)
            want = step_micro_batches(listed.examples, shares[1], 0, packed, listed.sources)
            for a, b in zip(got, want):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                assert ("position_ids" in a) == packed


@pytest.mark.parametrize("packed", [False, True])
def test_training_on_the_mapped_cache_gives_the_same_losses(both_paths, formatted, packed):
    cfg, tok = formatted
    losses = []
    for path in both_paths:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.base, dtype=torch.float32)
        train = TrainConfig(method="full", max_steps=3, micro_batch_size=4, grad_accum_steps=2, packing=packed, seed=5)
        result = train_loop(
            model, path.examples, train, tok.pad_token_id, sources=path.sources, source_names=path.source_names
        )
        losses.append([(h["train_loss"], h.get("train_loss/long"), h.get("train_loss/short")) for h in result.history])
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_chunked_writes_equal_one_write_and_an_interrupted_write_is_no_cache(tmp_path):
    rows = [(f"r{i}", Encoded(list(range(i + 1)), [IGNORE] + list(range(1, i + 1))), i % 2 == 0, i) for i in range(9)]
    write_cache(tmp_path / "one", {"k": 1}, {"train": rows})
    with TokenCacheWriter(tmp_path / "chunked", {"k": 1}) as writer:
        for start in (0, 4, 5):
            part = rows[start : {0: 4, 4: 5, 5: 9}[start]]
            writer.add("train", [r[0] for r in part], [r[1] for r in part], [r[2] for r in part], [r[3] for r in part])
    one, chunked = read_cache(tmp_path / "one", "train", {"k": 1}), read_cache(tmp_path / "chunked", "train", {"k": 1})
    for got in (one, chunked):
        assert [(e.input_ids, e.labels) for e in got] == [(r[1].input_ids, r[1].labels) for r in rows]
        assert got.ids.to_pylist() == [r[0] for r in rows] and got.lost.tolist() == [r[3] for r in rows]
        assert got.truncated.tolist() == [r[2] for r in rows] and isinstance(got.input_ids, np.memmap)
    assert len(read_cache(tmp_path / "one", "val", {"k": 1})) == 0  # a split without rows is an empty cache
    assert read_cache(tmp_path / "one", "train", {"k": 2}) is None
    with pytest.raises(RuntimeError):
        with TokenCacheWriter(tmp_path / "one", {"k": 1}) as writer:
            writer.add("train", ["a"], [Encoded([1, 2], [IGNORE, 2])], [False], [0])
            raise RuntimeError("killed mid-write")
    assert read_cache(tmp_path / "one", "train", {"k": 1}) is None


def _fresh(path: Path) -> dict[str, str]:
    import hashlib

    return {name: hashlib.new(name, path.read_bytes()).hexdigest() for name in ("md5", "sha256")}


def test_recorded_digests_equal_fresh_hashes_and_a_changed_file_is_hashed_again(tmp_path, monkeypatch):
    """What the format stage records (remember_digests) the train stage reuses, in another process, from the cache
    folder, across the rename of the folder, and only while each file keeps its size and mtime."""
    import hashlib
    import os

    import sftops.provenance.fingerprints as fingerprints
    from sftops.provenance.manifest import dvc_md5, folder_hashes

    monkeypatch.setenv("SFTOPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprints, "REMEMBER_FROM_BYTES", 1 << 20)
    monkeypatch.setattr(fingerprints, "_REMEMBERED", {})
    written = tmp_path / ".curated.tmp"  # the format stage writes here, then renames it (outputs.replaced_whole)
    written.mkdir()
    big, small = written / "train.bin", written / "stats.json"
    big.write_bytes(bytes(range(256)) * 9000)  # 2.3 MB, over more than one 1 MiB block: remembered
    small.write_text('{"a": 1}')  # under REMEMBER_FROM_BYTES: hashed every time
    fingerprints.remember_digests(written)
    assert sorted(p.name for p in written.iterdir()) == ["stats.json", "train.bin"]  # the record is not in the folder
    before = _fresh(big)
    # A same-size change whose old mtime is put back (touch -r) is the one change the record cannot see (nor can
    # DVC's): here it proves that the digest below comes from the record, not from reading the bytes.
    stat = big.stat()
    with big.open("r+b") as fh:
        fh.write(b"\xff" * 16)
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    curated = tmp_path / "curated"
    written.rename(curated)
    big, small = curated / "train.bin", curated / "stats.json"
    monkeypatch.setattr(fingerprints, "_REMEMBERED", {})  # another process: only the cache folder's record
    assert fingerprints.file_digests(big) == before != _fresh(big)

    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same size, new mtime: hashed again
    after = _fresh(big)
    assert fingerprints.file_digests(big) == after and fingerprints.file_sha256(big) == after["sha256"]
    small_stat = small.stat()
    small.write_text('{"a": 2}')
    os.utime(small, ns=(small_stat.st_atime_ns, small_stat.st_mtime_ns))
    assert fingerprints.file_md5(small) == hashlib.md5(b'{"a": 2}').hexdigest()  # small files: never remembered

    monkeypatch.setattr(fingerprints, "_REMEMBERED", {})
    listing = [{"md5": _fresh(curated / n)["md5"], "relpath": n} for n in ("stats.json", "train.bin")]
    assert dvc_md5(curated) == hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"
    assert folder_hashes(curated) == {n: _fresh(curated / n)["sha256"] for n in ("stats.json", "train.bin")}


def test_an_unreadable_digest_record_only_costs_a_hash(tmp_path, monkeypatch):
    import sftops.provenance.fingerprints as fingerprints

    monkeypatch.setenv("SFTOPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprints, "REMEMBER_FROM_BYTES", 0)
    monkeypatch.setattr(fingerprints, "_REMEMBERED", {})
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / fingerprints.DIGESTS_FILE).write_text("{not json")  # e.g. a disk that filled mid-write
    data = tmp_path / "a.bin"
    data.write_bytes(b"abc" * 1000)
    assert fingerprints.file_digests(data) == _fresh(data)
    monkeypatch.setattr(fingerprints, "_REMEMBERED", {})
    record = json.loads((tmp_path / "cache" / fingerprints.DIGESTS_FILE).read_text())
    assert [entry["sha256"] for entry in record.values()] == [_fresh(data)["sha256"]]
