"""The format stage's decisions over the whole set, taken on pass 1's small per-row arrays: exact and near
duplicates, source caps and weights, the splits, the mask self-check and the length policy; then pass 2, which
streams the chunks into the curated split files and the tokenised cache. The stage itself is
sftops.stages.format."""

from __future__ import annotations

import hashlib
import json
import queue
import random
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from sftops.config import Config, SourceConfig
from sftops.data.chunks import (
    AUTO,
    KEPT,
    OVERFLOW_ERROR,
    SPLIT_CODES,
    TOO_LONG,
    ChunkMapper,
    ChunkResult,
    map_chunks,
    progress_total,
    read_chunk,
    read_jobs,
)
from sftops.data.dedup import near_duplicates_of
from sftops.data.rejections import ingest_kind, refuse_empty
from sftops.data.selfcheck import self_check
from sftops.data.split import ContaminationIndex
from sftops.data.store import SPLITS, SplitWriter, TokenCacheWriter, cache_key, split_file
from sftops.data.tokenize import Renderer, encode_batch
from sftops.errors import DataError

COUNTS = (
    "read",
    "rejected_ingest",
    "rejected_format",
    "duplicates",
    "sampled_out",
    "dropped_tokens",
    "kept",
    "train_rows",
)

Message = dict[str, Any]
SPLIT_NAMES = {code: name for name, code in SPLIT_CODES.items()}


def prompt_key(messages: list[Message]) -> str:
    """Everything before the final response, exactly: rows with the same prompt share references."""
    return json.dumps(messages[:-1], ensure_ascii=False, sort_keys=True)


def _seeded_rank(seed: int, rid: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{rid}".encode()).digest()


class Ledger:
    """Every row that leaves, with its source, origin, kind and reason, and the per-source counts."""

    def __init__(self, sources: list[SourceConfig], ingest: dict[str, Any]) -> None:
        self.rejected: list[dict[str, Any]] = []
        self.reasons: Counter[str] = Counter()
        self.counts = {s.name: Counter() for s in sources}
        self.unused: dict[str, Counter[str]] = {s.name: Counter() for s in sources}
        for s in sources:
            self.counts[s.name]["read"] = ingest["sources"][s.name]["read"]
            self.counts[s.name]["rejected_ingest"] = ingest["sources"][s.name]["rejected"]

    def add_ingest_rejections(self, records: list[dict[str, Any]]) -> None:
        for rec in records:
            kind = ingest_kind(rec["reason"])
            self.rejected.append({"stage": "ingest", "kind": kind, **rec})
            self.reasons[kind] += 1

    def reject(self, source: str, origin: str, kind: str, reason: str, counter: str, **extra: Any) -> None:
        self.rejected.append(
            {"stage": "format", "source": source, "origin": origin, "kind": kind, "reason": reason, **extra}
        )
        self.reasons[kind] += 1
        self.counts[source][counter] += 1

    def per_source(self) -> dict[str, dict[str, int]]:
        out = {}
        for name, c in self.counts.items():
            s = {k: int(c[k]) for k in COUNTS}
            accounted = sum(s[k] for k in COUNTS[1:-1])
            assert s["read"] == accounted, f"source {name}: read {s['read']} != {accounted} accounted for"
            out[name] = s
        return out


def refuse_too_few(counts: dict[str, int], cfg: Config) -> None:
    """Training needs train rows and evaluation test rows: say so now, not after a model was trained."""
    d = cfg.data
    split = (
        f"{sum(counts.values())} rows kept, split train/val/test = {counts['train']}/{counts['val']}/{counts['test']}"
    )
    if counts["train"] == 0:
        raise DataError(
            f"{split}: no train rows; add data, lower data.val_fraction/test_fraction or raise model.max_length "
            f"(now {cfg.model.max_length})"
        )
    if counts["test"] < d.min_test_rows:
        raise DataError(
            f"{split}: evaluation needs at least data.min_test_rows={d.min_test_rows} test rows; add data, raise "
            f"data.test_fraction (now {d.test_fraction}), give a source with split_as: test, or set "
            "data.min_test_rows=0 to prepare data without evaluating"
        )


def split_warnings(counts: dict[str, int], cfg: Config) -> list[str]:
    """What the splits lack without stopping the stage: a validation split asked for (data.val_fraction, or a
    source with split_as: val) that came out empty, so training measures no validation loss."""
    d = cfg.data
    asked = d.val_fraction > 0 or any(s.split_as == "val" for s in d.sources)
    if not asked or counts["val"] > 0:
        return []
    return [
        f"the validation split is empty ({sum(counts.values())} rows kept, data.val_fraction {d.val_fraction}): "
        "training measures no validation loss; add data, raise data.val_fraction or give a source with split_as: val"
    ]


CANDIDATE_MAX_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)


def rows_within(totals: np.ndarray, max_length: int) -> dict[str, int]:
    """How many rows each candidate model.max_length would keep whole: the numbers to choose it by."""
    candidates = sorted({*CANDIDATE_MAX_LENGTHS, max_length})
    return {str(n): int((np.asarray(totals) <= n).sum()) for n in candidates}


class Rows:
    """Pass 1's per-row arrays of all chunks end to end, in input order (source by source, row by row)."""

    def __init__(self, results: list[ChunkResult]) -> None:
        self.chunks = [(r.number, r.source, len(r)) for r in results]
        starts = np.cumsum([0] + [len(r) for r in results])
        self.chunk_start = starts[:-1]
        self.source = np.concatenate(
            [np.full(len(r), r.source, dtype=np.int16) for r in results] or [np.zeros(0, np.int16)]
        )

        def joined(name: str, dtype: Any, shape: tuple = ()) -> np.ndarray:
            parts = [getattr(r, name) for r in results]
            return np.concatenate(parts) if parts else np.zeros((0, *shape), dtype=dtype)

        self.ids = joined("ids", np.uint64)
        self.text_keys = joined("text_keys", np.uint64, (2,))
        self.prompt_keys = joined("prompt_keys", np.uint64)
        self.auto_split, self.split_as = joined("auto_split", np.int8), joined("split_as", np.int8)
        self.lengths = joined("lengths", np.int32, (3,))
        self.verdict, self.truncated = joined("verdict", np.int8), joined("truncated", bool)
        self.prompt_tokens_cut = joined("prompt_tokens_cut", np.int32)
        self.response_tokens_lost = joined("response_tokens_lost", np.int32)
        self.signatures = (
            np.concatenate([r.signatures for r in results]) if results and results[0].signatures is not None else None
        )
        self.origins = pa.chunked_array([r.origins for r in results], pa.string())
        self.reasons = {int(starts[k]) + i: why for k, r in enumerate(results) for i, why in r.reasons.items()}
        self.test_prompts = {int(starts[k]) + i: p for k, r in enumerate(results) for i, p in r.fixed_prompts.items()}

    def __len__(self) -> int:
        return len(self.ids)

    def origin(self, i: int) -> str:
        return self.origins[int(i)].as_py()

    def row_id(self, i: int) -> str:
        return f"{int(self.ids[i]):016x}"


def _seeded_ranks(seed: int, rows: Rows, indices: np.ndarray) -> np.ndarray:
    """indices ordered by the seeded hash of their row ids: a sample by it keeps its rows when rows are added."""
    return indices[np.argsort([_seeded_rank(seed, rows.row_id(i)) for i in indices], kind="stable")]


def map_all(
    cfg: Config, tokenizer: Any, render: Renderer, raw: Path, chunks: Path, ingest: dict[str, Any], ledger: Ledger
) -> Rows:
    """Pass 1 over every source; the rejections of mapping go to the ledger in input order."""
    d = cfg.data
    mapper = ChunkMapper(cfg, tokenizer, chunks, render)
    results, reasons = [], {s.name: [] for s in d.sources}
    bar = tqdm(total=progress_total(ingest, d.sources), desc="format: map and tokenise", unit=" rows", leave=False)
    with bar:
        for result in map_chunks(mapper, read_jobs(raw, d.sources, d.chunk_rows), d.workers):
            name = d.sources[result.source].name
            for rec in result.rejected:
                ledger.reject(name, rec["origin"], rec["kind"], rec["reason"], "rejected_format")
                reasons[name].append(rec["reason"])
            ledger.unused[name].update(result.unused)
            bar.update(len(result) + len(result.rejected))
            results.append(result)
    rows = Rows(results)
    del results
    mapped = np.bincount(rows.source, minlength=len(d.sources))
    for index, source in enumerate(d.sources):
        if mapped[index] == 0 and d.stop_on_empty_source:
            refuse_empty(source, ledger.counts[source.name]["read"], reasons[source.name], "format")
    return rows


def remove_duplicates(rows: Rows, threshold: float | None, sources: list[SourceConfig], ledger: Ledger) -> np.ndarray:
    """Exact duplicates of the normalised text, then near-duplicates (MinHash) among the rest; the first copy is
    kept and each removed row names it. Returns the kept rows' indices, in input order."""
    keys = np.ascontiguousarray(rows.text_keys).view(np.dtype((np.void, 16))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    first_of = first[inverse.ravel()]
    unique = np.flatnonzero(first_of == np.arange(len(rows)))
    removed = [(i, first_of[i], "exact duplicate") for i in np.flatnonzero(first_of != np.arange(len(rows)))]
    if threshold is not None and len(unique):
        dups, kept, sims = near_duplicates_of(rows.signatures[unique], threshold)
        removed += [(unique[j], unique[k], f"near duplicate ({sim:.2f})") for j, k, sim in zip(dups, kept, sims)]
        unique = np.delete(unique, dups)
    for i, copy, what in removed:
        copy_origin = rows.origin(copy)
        ledger.reject(
            sources[rows.source[i]].name,
            rows.origin(i),
            what.split(" (")[0],
            f"{what} of {copy_origin}",
            "duplicates",
            kept_copy=copy_origin,
        )
    return unique


def cap_sources(rows: Rows, alive: np.ndarray, sources: list[SourceConfig], seed: int, ledger: Ledger) -> np.ndarray:
    """A source's max_rows: a seeded sample by row id, so the rows chosen stay chosen when rows are added."""
    keep = np.ones(len(alive), dtype=bool)
    for index, source in enumerate(sources):
        mine = np.flatnonzero(rows.source[alive] == index)
        if source.max_rows is not None and len(mine) > source.max_rows:
            dropped = _seeded_ranks(seed, rows, alive[mine])[source.max_rows :]
            ledger.counts[source.name]["sampled_out"] = len(dropped)
            keep[np.isin(alive, dropped)] = False
    return alive[keep]  # still in input order


def assign_splits(rows: Rows, alive: np.ndarray) -> np.ndarray:
    """Fixed-split sources (split_as) first; any row sharing a prompt with them follows them; the rest by the
    seeded hash of the prompt (computed in pass 1). The split code of each alive row."""
    fixed_as = rows.split_as[alive]
    split = np.where(fixed_as != AUTO, fixed_as, rows.auto_split[alive])
    fixed = np.flatnonzero(fixed_as != AUTO)
    if len(fixed):
        follow = dict(zip(rows.prompt_keys[alive[fixed]].tolist(), fixed_as[fixed].tolist()))  # the last one wins
        auto = np.flatnonzero(fixed_as == AUTO)
        split[auto] = [follow.get(k, s) for k, s in zip(rows.prompt_keys[alive[auto]].tolist(), split[auto].tolist())]
    return split


def check_masks(cfg: Config, tokenizer: Any, render: Renderer, rows: Rows, alive: np.ndarray, chunks: Path) -> int:
    """The mask self-check on a seeded sample of the rows (re-encoded from pass 1's files: the same encoder).
    Each chunk holding sampled rows is read once, the four columns the check needs only."""
    from sftops.data.store import _from_record

    sample = random.Random(cfg.data.split_seed).sample(range(len(alive)), min(cfg.data.self_check_rows, len(alive)))
    sampled = alive[sample].tolist()
    found = {}
    by_chunk = defaultdict(list)
    for i in sampled:
        by_chunk[int(np.searchsorted(rows.chunk_start, i, side="right") - 1)].append(i)
    for chunk, members in by_chunk.items():
        table, _ = read_chunk(chunks, rows.chunks[chunk][0], columns=["source", "origin", "messages", "tools"])
        local = [i - int(rows.chunk_start[chunk]) for i in members]
        for i, rec in zip(members, table.take(pa.array(local)).to_pylist()):
            rec = _from_record(rec)
            found[i] = (f"{rec['source']} {rec['origin']}", {"messages": rec["messages"], "tools": rec["tools"]})
    picked = [found[i] for i in sampled]  # in the sample's order, as before
    encoded = encode_batch(tokenizer, [conv for _, conv in picked], render)
    return self_check(tokenizer, [(where, conv, enc) for (where, conv), enc in zip(picked, encoded)])


def apply_length_policy(cfg: Config, rows: Rows, alive: np.ndarray, ledger: Ledger) -> tuple[np.ndarray, dict]:
    """The verdicts pass 1 reached, applied to the rows still in: the kept rows' indices and the counts."""
    sources, max_length = cfg.data.sources, cfg.model.max_length
    verdict = rows.verdict[alive]
    errors = np.flatnonzero(verdict == OVERFLOW_ERROR)
    if len(errors):
        raise DataError(rows.reasons[int(alive[errors[0]])])
    kept = verdict == KEPT
    for i in alive[~kept]:
        kind = "too long" if rows.verdict[i] == TOO_LONG else "no supervised tokens"
        ledger.reject(sources[rows.source[i]].name, rows.origin(i), kind, rows.reasons[int(i)], "dropped_tokens")
    for index, source in enumerate(sources):
        ledger.counts[source.name]["kept"] = int((rows.source[alive[kept]] == index).sum())
        dropped = [rows.reasons[int(i)] for i in alive[~kept] if rows.source[i] == index]
        if ledger.counts[source.name]["kept"] == 0 and dropped and cfg.data.stop_on_empty_source:
            refuse_empty(source, ledger.counts[source.name]["read"], dropped, "format")
    overflow = {
        "policy": cfg.data.overflow,
        "max_length": max_length,
        "rows_over": int((rows.lengths[alive, 2] > max_length).sum()),
        "dropped_too_long": int((verdict == TOO_LONG).sum()),
        "truncated": int(rows.truncated[alive[kept]].sum()),
        "prompt_tokens_cut": int(rows.prompt_tokens_cut[alive[kept]].sum()),
        "response_tokens_lost": int(rows.response_tokens_lost[alive].sum()),
        "dropped_no_target": int((~kept & (verdict != TOO_LONG)).sum()),
    }
    return alive[kept], overflow


def train_copies(
    rows: Rows, train: np.ndarray, sources: list[SourceConfig], seed: int
) -> dict[int, tuple[int, np.ndarray]]:
    """Per source, its train rows' `weight`: (whole repeats, the rows of the fractional part: a seeded sample of
    round(frac x rows), in input order). Weight 0.5: half of them once; 2.5: all twice plus half once more."""
    plan = {}
    for index, source in enumerate(sources):
        mine = train[rows.source[train] == index]
        whole, frac = divmod(source.weight, 1.0)
        part = np.sort(_seeded_ranks(seed + 1, rows, mine)[: round(frac * len(mine))]) if frac else mine[:0]
        plan[index] = (int(whole), part)
    return plan


def _token_spans(offsets: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The flat token positions of the rows `local` (end to end) and each row's length."""
    starts, lengths = offsets[local], offsets[local + 1] - offsets[local]
    before = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum())) + np.repeat(starts - before, lengths), lengths


class OutputWriter:
    """The curated split files and the tokenised cache, fed one chunk's rows at a time."""

    def __init__(self, out: Path, cache: TokenCacheWriter, rows: Rows, bar: tqdm) -> None:
        self.splits = {split: SplitWriter(split_file(out, split)) for split in SPLITS}
        self.cache, self.rows, self.bar, self.counts = cache, rows, bar, Counter()

    def add(self, split: str, table: pa.Table, tokens: dict[str, np.ndarray], first: int, local: np.ndarray) -> None:
        """Rows `local` of the chunk whose first row is global row `first`."""
        if not len(local):
            return
        picked = table.take(pa.array(local))
        picked = picked.set_column(
            picked.schema.get_field_index("split"), "split", pa.array([split] * len(local), pa.string())
        )
        self.splits[split].add(picked)
        spans, lengths = _token_spans(tokens["offsets"], local)
        where = first + local
        self.cache.add_arrays(
            split,
            picked.column("id").combine_chunks(),
            tokens["input_ids"][spans],
            tokens["labels"][spans],
            lengths,
            self.rows.truncated[where],
            self.rows.response_tokens_lost[where],
        )
        self.counts[split] += len(local)
        self.bar.update(len(local))

    def close(self) -> None:
        for writer in self.splits.values():
            writer.close()


class InBackground:
    """Calls fn on each item put, in order, in one background thread; close() waits for the last and raises the
    first error fn raised. Pass 2 adds the train prompts to the contamination index here: Arrow and numpy do most
    of that work without the GIL, beside the writing, on the core pass 2 would leave idle."""

    def __init__(self, fn: Callable[[Any], None], depth: int = 4) -> None:
        self.items: queue.Queue = queue.Queue(maxsize=depth)  # bounded: the items wait in memory
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[Any], None]) -> None:
        while (item := self.items.get()) is not None:
            if self.error is None:
                try:
                    fn(item)
                except BaseException as exc:  # raised in the caller's thread, by put() or close()
                    self.error = exc

    def put(self, item: Any) -> None:
        if self.error is not None:
            raise self.error
        self.items.put(item)

    def close(self) -> None:
        if self.thread.is_alive():
            self.items.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> InBackground:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        elif self.thread.is_alive():  # an error on the way: stop the thread, keep the caller's error
            self.items.put(None)
            self.thread.join()


def write_outputs(
    cfg: Config,
    tokenizer: Any,
    rows: Rows,
    kept: np.ndarray,
    split_code: np.ndarray,
    plan: dict[int, tuple[int, np.ndarray]],
    chunks: Path,
    out: Path,
    contamination: ContaminationIndex,
) -> dict[str, Any]:
    """Pass 2: the kept rows of each chunk into their split files and the tokenised cache, in input order, source
    by source: its val and test rows, its train rows `whole` times, then the fractional sample. Train prompts
    go to the contamination index as they pass (once per row), in a background thread."""
    is_kept = np.zeros(len(rows), dtype=bool)
    is_kept[kept] = True
    train_code = SPLIT_CODES["train"]
    train = is_kept & (split_code == train_code)
    total = int((is_kept & ~train).sum()) + sum(
        whole * int((train & (rows.source == index)).sum()) + len(part) for index, (whole, part) in plan.items()
    )
    train_rows = Counter()
    bar = tqdm(total=total, desc="format: write", unit=" rows", leave=False)
    with TokenCacheWriter(out, {}) as cache, bar, InBackground(contamination.add_train) as background:
        writer = OutputWriter(out, cache, rows, bar)
        for index in range(len(cfg.data.sources)):
            whole, part = plan[index]
            in_part = np.zeros(len(rows), dtype=bool)
            in_part[part] = True
            mine = [
                (number, int(rows.chunk_start[k]), n)
                for k, (number, source, n) in enumerate(rows.chunks)
                if source == index
            ]
            for repeat in range(max(whole, 1)):
                for number, first, n in mine:
                    table, tokens = read_chunk(chunks, number)
                    codes, ok = split_code[first : first + n], is_kept[first : first + n]
                    if repeat == 0:
                        for split in ("val", "test"):
                            writer.add(split, table, tokens, first, np.flatnonzero(ok & (codes == SPLIT_CODES[split])))
                    if repeat < whole:
                        local = np.flatnonzero(ok & (codes == train_code))
                        writer.add("train", table, tokens, first, local)
                        train_rows[index] += len(local)
                        if repeat == 0:
                            background.put(table.column("prompt").take(pa.array(local)))
            for number, first, n in mine if len(part) else ():
                table, tokens = read_chunk(chunks, number)
                local = np.flatnonzero(in_part[first : first + n])
                writer.add("train", table, tokens, first, local)
                train_rows[index] += len(local)
                if whole == 0:
                    background.put(table.column("prompt").take(pa.array(local)))
        writer.close()
        cache.key = cache_key(
            out, tokenizer, cfg.model.max_length, cfg.data.overflow
        )  # of the split files just written
    return {"splits": {split: writer.counts[split] for split in SPLITS}, "train_rows": train_rows}
