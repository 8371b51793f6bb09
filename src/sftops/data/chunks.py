"""The format stage's first pass, one chunk of raw rows at a time, in worker processes: each row is mapped to a
canonical conversation (or rejected with its reason), tokenised and fitted to model.max_length. What the
stage's global decisions need (duplicate keys, MinHash signatures, split hashes, lengths, the length policy's
verdict) comes back as small arrays; what the second pass writes (the rows and their tokens) goes to the
chunk's own files. A chunk's result depends on its own rows only, so any chunk size and any number of workers
give the same curated data."""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sftops.config import Config
from sftops.data.dedup import minhash_signatures, normalise
from sftops.data.schemas import RowError, to_conversation
from sftops.data.split import joined, message_words, split_of
from sftops.data.store import SCHEMA, rows_table
from sftops.data.tokenize import Renderer, encode_runs, fit, labels_from_runs, labels_of, runs_of
from sftops.encoded import Encoded
from sftops.errors import DataError

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
AUTO = -1  # split_as: auto (the seeded prompt hash decides)
# The length policy's verdict per mapped row
KEPT, TOO_LONG, NO_TARGET, OVERFLOW_ERROR = 0, 1, 2, 3
VERDICT_KINDS = {TOO_LONG: "too long", NO_TARGET: "no supervised tokens"}
# A chunk's rows as pass 2 writes them: the curated schema plus each row's normalised prompt (contamination)
CHUNK_SCHEMA = SCHEMA.append(pa.field("prompt", pa.string()))


@dataclass
class Job:
    number: int
    source: int  # index into data.sources
    lines: list[bytes]  # JSON lines of data/raw/<source>.jsonl


@dataclass
class ChunkResult:
    number: int
    source: int
    rejected: list[dict[str, Any]]  # rows that map to no conversation: origin, kind, reason
    unused: Counter[str]
    ids: np.ndarray  # uint64: the row id (16 hex digits) of each mapped row
    origins: pa.Array
    text_keys: np.ndarray  # (rows, 2) uint64: sha256 of the normalised conversation text (exact duplicates)
    signatures: np.ndarray | None  # MinHash of that text (near duplicates); None when that check is off
    prompt_keys: np.ndarray  # uint64: sha256 of the normalised prompt (rows sharing a prompt share a split)
    auto_split: np.ndarray  # int8 split code from the seeded prompt hash
    split_as: np.ndarray  # int8 split code the source fixes, or AUTO
    fixed_prompts: dict[int, str]  # row -> normalised prompt, for rows whose auto split is test or fixed
    lengths: np.ndarray  # (rows, 3) int32: prompt, response, total tokens before the length policy
    verdict: np.ndarray  # int8: KEPT, TOO_LONG, NO_TARGET, OVERFLOW_ERROR
    reasons: dict[int, str] = field(default_factory=dict)  # row -> why it is not kept
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    prompt_tokens_cut: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    response_tokens_lost: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    def __len__(self) -> int:
        return len(self.ids)


# What json.dumps(body, ensure_ascii=False, sort_keys=True) builds on every call, built once (the same text)
_ID_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True)


def row_id(messages: list[dict[str, Any]], tools: list | None = None) -> str:
    body = {"messages": messages, "tools": tools} if tools else messages
    return hashlib.sha256(_ID_JSON.encode(body).encode()).hexdigest()[:16]


def conversation_and_prompt(messages: list[dict[str, Any]]) -> tuple[str, str]:
    """The normalised conversation (each turn's role, content and tool calls: exact and near duplicates are
    found on it) and the normalised prompt (prompt_text), from one normalisation of each turn."""
    words = [message_words(m) for m in messages]
    calls = [normalise(json.dumps(m["tool_calls"])) if m.get("tool_calls") else "" for m in messages]
    return joined(part for pair in zip(words, calls) for part in pair), joined(words[:-1])


def conversation_text(messages: list[dict[str, Any]]) -> str:
    return conversation_and_prompt(messages)[0]


def _key128(text: str) -> tuple[int, int]:
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")


def _key64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


TOKEN_ARRAYS = ("input_ids", "labels", "offsets")


def chunk_paths(folder: Path, number: int) -> tuple[Path, dict[str, Path]]:
    """A chunk's rows (Parquet) and its token arrays (.npy each: read memory-mapped, with no unzipping)."""
    return folder / f"{number:06d}.parquet", {k: folder / f"{number:06d}.{k}.npy" for k in TOKEN_ARRAYS}


def check_tools_render(render: Renderer, conv: dict[str, Any], origin: str) -> None:
    """Tool definitions and calls must appear in the rendering, or the model would train without them."""
    names = [t.get("function", t).get("name") for t in conv["tools"] or [] if isinstance(t, dict)]
    calls = [c["function"]["name"] for m in conv["messages"] for c in m.get("tool_calls") or []]
    if not names and not calls:
        return
    text = render(conv["messages"], conv["tools"])
    missing = [n for n in names + calls if n and n not in text]
    if missing:
        raise DataError(
            f"{origin}: the chat template does not render tools/tool calls ({missing} missing from the "
            "rendered text); use a model whose template supports tools, or remove these rows"
        )


class ChunkMapper:
    """Maps one Job to its ChunkResult and files. Built once per process (the tokenizer and template with it)."""

    def __init__(self, cfg: Config, tokenizer: Any, folder: Path, render: Renderer | None = None) -> None:
        self.cfg, self.tokenizer, self.folder = cfg, tokenizer, folder
        self.render = render or Renderer(tokenizer)

    def __call__(self, job: Job) -> ChunkResult:
        d, source = self.cfg.data, self.cfg.data.sources[job.source]
        rejected, unused, rows, convs = [], Counter(), [], []
        for line in job.lines:
            raw = json.loads(line)
            try:
                conv = to_conversation(raw["fields"], source.row_schema, source.fields, tuple(source.ignore))
            except RowError as exc:
                rejected.append({"origin": raw["origin"], "kind": exc.kind, "reason": str(exc)})
                continue
            unused.update(conv.pop("unused"))
            check_tools_render(self.render, conv, raw["origin"])
            rows.append(
                {
                    "id": row_id(conv["messages"], conv["tools"]),
                    "source": source.name,
                    "origin": raw["origin"],
                    "split": "",
                    **conv,
                }
            )
            convs.append(conv)
        encoded = encode_runs(self.tokenizer, convs, self.render)
        n = len(rows)
        pairs = [conversation_and_prompt(r["messages"]) for r in rows]
        texts, prompts = [text for text, _ in pairs], [prompt for _, prompt in pairs]
        auto = np.array(
            [SPLIT_CODES[split_of(p, d.split_seed, d.val_fraction, d.test_fraction)] for p in prompts], dtype=np.int8
        )
        fixed_as = AUTO if source.split_as == "auto" else SPLIT_CODES[source.split_as]
        result = ChunkResult(
            number=job.number,
            source=job.source,
            rejected=rejected,
            unused=unused,
            ids=np.array([int(r["id"], 16) for r in rows], dtype=np.uint64),
            origins=pa.array([r["origin"] for r in rows], pa.string()),
            text_keys=np.array([_key128(t) for t in texts], dtype=np.uint64).reshape(n, 2),
            signatures=minhash_signatures(texts, seed=d.split_seed, normalised=True)
            if d.near_duplicate_threshold is not None
            else None,
            prompt_keys=np.array([_key64(p) for p in prompts], dtype=np.uint64),
            auto_split=auto,
            split_as=np.full(n, fixed_as, dtype=np.int8),
            # the prompts a test row can have (contamination): auto test rows', and a test source's (rows sharing
            # its prompts follow it into test)
            fixed_prompts={
                i: p
                for i, p in enumerate(prompts)
                if (auto[i] if fixed_as == AUTO else fixed_as) == SPLIT_CODES["test"]
            },
            lengths=np.zeros((n, 3), dtype=np.int32),
            verdict=np.zeros(n, dtype=np.int8),
            truncated=np.zeros(n, dtype=bool),
            prompt_tokens_cut=np.zeros(n, dtype=np.int32),
            response_tokens_lost=np.zeros(n, dtype=np.int32),
        )
        tokens = self._fit_all(result, rows, convs, encoded, prompts)
        self._write(job.number, rows, tokens)
        return result

    def _fit_all(
        self, result: ChunkResult, rows: list[dict], convs: list[dict], encoded: list, prompts: list[str]
    ) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """The length policy on each row (its verdict and counts into result); the tokens as trained, as ids
        and target runs."""
        max_length, policy = self.cfg.model.max_length, self.cfg.data.overflow
        tokens = []
        for i, (row, conv, (ids, runs)) in enumerate(zip(rows, convs, encoded)):
            targets = sum(end - first for first, end in runs)
            result.lengths[i] = (len(ids) - targets, targets, len(ids))
            if targets and len(ids) <= max_length:  # what fit() keeps as it is, without building its labels
                tokens.append((ids, runs))
                row.update(messages_as_trained=None, prompt_tokens_cut=0, response_tokens_lost=0, prompt=prompts[i])
                continue
            where, enc = f"{row['source']} {row['origin']}", Encoded(ids, labels_of(ids, runs))
            try:
                fitted = fit(self.tokenizer, self.render, conv, enc, max_length, policy, where)
            except DataError as exc:  # data.overflow: error; raised by the stage only if the row survives dedup
                result.verdict[i], result.reasons[i] = OVERFLOW_ERROR, str(exc)
                tokens.append(([], []))
                row.update(prompt=prompts[i])
                continue
            result.response_tokens_lost[i] = fitted.response_tokens_lost
            if fitted.encoded is None:
                result.verdict[i] = TOO_LONG if fitted.kind == "too long" else NO_TARGET
                result.reasons[i] = f"{fitted.kind}: {fitted.reason}"
                tokens.append(([], []))
            else:
                result.truncated[i], result.prompt_tokens_cut[i] = fitted.truncated, fitted.prompt_tokens_cut
                tokens.append((fitted.encoded.input_ids, runs_of(fitted.encoded.labels)))
            row.update(
                messages_as_trained=fitted.messages,
                prompt_tokens_cut=fitted.prompt_tokens_cut,
                response_tokens_lost=fitted.response_tokens_lost,
                prompt=prompts[i],
            )
        return tokens

    def _write(self, number: int, rows: list[dict], tokens: list[tuple[list[int], list[tuple[int, int]]]]) -> None:
        table_path, token_paths = chunk_paths(self.folder, number)
        table = rows_table(rows, CHUNK_SCHEMA, prompt=[r["prompt"] for r in rows])
        pq.write_table(table, table_path, compression="none")  # read once, soon, from the page cache: no codec
        lengths = np.fromiter((len(ids) for ids, _ in tokens), dtype=np.int64, count=len(tokens))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        input_ids = np.fromiter(chain.from_iterable(ids for ids, _ in tokens), dtype=np.int32, count=int(offsets[-1]))
        runs = np.array([run for _, row_runs in tokens for run in row_runs], dtype=np.int64).reshape(-1, 2)
        row_start = np.repeat(offsets[:-1], [len(row_runs) for _, row_runs in tokens])
        arrays = {
            "input_ids": input_ids,
            "labels": labels_from_runs(input_ids, row_start + runs[:, 0], row_start + runs[:, 1]),
            "offsets": offsets,
        }
        for name, path in token_paths.items():
            np.save(path, arrays[name])


def read_jobs(raw: Path, sources: Iterable[Any], chunk_rows: int) -> Iterator[Job]:
    """The raw rows of each source, in order, chunk_rows lines at a time; a chunk never spans two sources."""
    number = 0
    for index, source in enumerate(sources):
        lines: list[bytes] = []
        with open(raw / f"{source.name}.jsonl", "rb") as f:
            for line in f:
                if line.strip():
                    lines.append(line)
                if len(lines) == chunk_rows:
                    yield Job(number, index, lines)
                    number, lines = number + 1, []
        if lines:
            yield Job(number, index, lines)
            number += 1


_WORKER: ChunkMapper | None = None  # set in the parent before the fork: each worker inherits it


def _worker_start() -> None:
    """A worker allocates millions of short-lived dicts and lists (rows, messages, token lists) without cycles:
    at the cyclic collector's default pace (a pass every 700 allocations) its passes took ~2.5% of the stage's
    CPU; every 50,000 they cost nothing measurable, and garbage with cycles is still collected."""
    gc.set_threshold(50_000, 20, 100)


def _in_worker(job: Job) -> ChunkResult:
    assert _WORKER is not None
    return _WORKER(job)


def map_chunks(mapper: ChunkMapper, jobs: Iterable[Job], workers: int) -> Iterator[ChunkResult]:
    """mapper over the jobs, results in job order. With workers > 1, forked processes (they inherit the loaded
    tokenizer) take jobs as they come, at most two per worker in flight, so the raw rows are never all in
    memory; an error in a worker is raised here."""
    if workers <= 1:
        yield from map(mapper, jobs)
        return
    global _WORKER
    _WORKER = mapper
    # The tokenizer's own thread pool must not run in forked children (it can deadlock): one thread each.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_start) as pool:
            pending: deque = deque()
            for job in jobs:
                pending.append(pool.apply_async(_in_worker, (job,)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        _WORKER = None


def read_chunk(folder: Path, number: int, columns: list[str] | None = None) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """A chunk's rows (these columns, or all) and its token arrays, memory-mapped."""
    table_path, token_paths = chunk_paths(folder, number)
    schema = CHUNK_SCHEMA if columns is None else pa.schema([CHUNK_SCHEMA.field(c) for c in columns])
    tokens = {name: np.load(path, mmap_mode="r") for name, path in token_paths.items()}
    return pq.read_table(table_path, schema=schema, columns=columns), tokens


def progress_total(ingest: dict[str, Any], sources: Iterable[Any]) -> int:
    return sum(ingest["sources"][s.name]["kept"] for s in sources)


__all__ = [
    "AUTO",
    "CHUNK_SCHEMA",
    "ChunkMapper",
    "ChunkResult",
    "Job",
    "KEPT",
    "NO_TARGET",
    "OVERFLOW_ERROR",
    "SPLIT_CODES",
    "TOO_LONG",
    "VERDICT_KINDS",
    "check_tools_render",
    "conversation_text",
    "map_chunks",
    "progress_total",
    "read_chunk",
    "read_jobs",
    "row_id",
]
