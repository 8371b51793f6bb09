"""The curated dataset on disk: one Parquet file per split with the canonical schema, and the tokenised
cache next to it, keyed by (data hash, tokenizer hash, template hash, max_length, overflow policy)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from sftops.chat import Encoded
from sftops.errors import DataError

SPLITS = ("train", "val", "test")
TOKENIZED = "tokenized"
CACHE_KEY = "key.json"

MESSAGE = pa.struct(
    [
        ("role", pa.string()),
        ("content", pa.string()),
        ("weight", pa.int8()),  # null: 1 (a target, for assistant turns)
        ("tool_calls", pa.string()),  # JSON, null when none
        ("tool_call_id", pa.string()),
        ("name", pa.string()),
    ]
)
SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # hash of the conversation
        ("source", pa.string()),  # the data.sources name, kept to the end (evaluation reports per source)
        ("origin", pa.string()),  # file#row of the raw row
        ("split", pa.string()),
        ("messages", pa.list_(MESSAGE)),
        ("tools", pa.string()),  # JSON list of tool definitions, null when none
        # data.overflow: truncate_prompt: the conversation as trained (JSON, null when not cut) and what was cut
        ("messages_as_trained", pa.string()),
        ("prompt_tokens_cut", pa.int32()),
        ("response_tokens_lost", pa.int32()),
    ]
)
TOKEN_SCHEMA = pa.schema(
    [("id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
     ("truncated", pa.bool_()), ("response_tokens_lost", pa.int32())]
)


def split_file(curated: Path, split: str) -> Path:
    return Path(curated) / f"{split}.parquet"


def _to_record(row: dict[str, Any]) -> dict[str, Any]:
    messages = [
        {
            "role": m["role"],
            "content": m["content"],
            "weight": m.get("weight"),
            "tool_calls": json.dumps(m["tool_calls"], ensure_ascii=False) if m.get("tool_calls") else None,
            "tool_call_id": m.get("tool_call_id"),
            "name": m.get("name"),
        }
        for m in row["messages"]
    ]
    tools = json.dumps(row["tools"], ensure_ascii=False) if row.get("tools") else None
    return {"id": row["id"], "source": row["source"], "origin": row["origin"], "split": row["split"],
            "messages": messages, "tools": tools,
            "messages_as_trained": json.dumps(row["messages_as_trained"], ensure_ascii=False) if row.get("messages_as_trained") else None,
            "prompt_tokens_cut": row.get("prompt_tokens_cut", 0),
            "response_tokens_lost": row.get("response_tokens_lost", 0)}


def _from_record(rec: dict[str, Any]) -> dict[str, Any]:
    messages = []
    for m in rec["messages"]:
        msg = {"role": m["role"], "content": m["content"]}
        if m["weight"] is not None:
            msg["weight"] = m["weight"]
        if m["tool_calls"] is not None:
            msg["tool_calls"] = json.loads(m["tool_calls"])
        for key in ("tool_call_id", "name"):
            if m[key] is not None:
                msg[key] = m[key]
        messages.append(msg)
    return {**rec, "messages": messages, "tools": json.loads(rec["tools"]) if rec["tools"] else None}


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([_to_record(r) for r in rows], schema=SCHEMA), path)


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [_from_record(r) for r in pq.read_table(path, schema=SCHEMA).to_pylist()]


def read_split(curated: str | Path, split: str) -> list[dict[str, Any]]:
    """The one reader of the curated data (train and evaluate use it): rows with id, source, origin, split,
    messages (canonical dicts) and tools."""
    path = split_file(Path(curated), split)
    if not path.exists():
        raise DataError(f"{path} not found: run `sftops format` (or `dvc repro`) first")
    return read_rows(path)


# ---- the tokenised cache --------------------------------------------------------------------------------


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def data_hash(curated: Path) -> str:
    """Of the curated split files' bytes: any change to the data changes it."""
    h = hashlib.sha256()
    for split in SPLITS:
        path = split_file(curated, split)
        h.update(path.read_bytes() if path.exists() else b"-")
    return h.hexdigest()


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    if getattr(tokenizer, "is_fast", False):
        body = tokenizer.backend_tokenizer.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha(body + json.dumps(tokenizer.special_tokens_map, sort_keys=True))


def cache_key(curated: Path, tokenizer: PreTrainedTokenizerBase, max_length: int, overflow: str) -> dict[str, Any]:
    return {
        "data": data_hash(curated),
        "tokenizer": tokenizer_hash(tokenizer),
        "template": _sha(tokenizer.chat_template or ""),
        "max_length": max_length,
        "overflow": overflow,
    }


def write_cache(curated: Path, key: dict[str, Any], encoded: dict[str, list[tuple[str, Encoded, bool, int]]]) -> None:
    """encoded: split -> [(row id, encoding, truncated, response tokens lost)]."""
    out = Path(curated) / TOKENIZED
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in encoded.items():
        table = pa.Table.from_pydict(
            {
                "id": [r[0] for r in rows],
                "input_ids": [r[1].input_ids for r in rows],
                "labels": [r[1].labels for r in rows],
                "truncated": [r[2] for r in rows],
                "response_tokens_lost": [r[3] for r in rows],
            },
            schema=TOKEN_SCHEMA,
        )
        pq.write_table(table, out / f"{split}.parquet")
    (out / CACHE_KEY).write_text(json.dumps(key, indent=2) + "\n")


def read_cache(curated: Path, split: str, key: dict[str, Any]) -> dict[str, tuple[Encoded, bool, int]] | None:
    """row id -> (encoding, truncated, response tokens lost), or None when the cache was made with another
    data, tokenizer, template, max_length or overflow policy."""
    folder = Path(curated) / TOKENIZED
    try:
        stored = json.loads((folder / CACHE_KEY).read_text())
    except (OSError, ValueError):
        return None
    if stored != key or not (folder / f"{split}.parquet").exists():
        return None
    table = pq.read_table(folder / f"{split}.parquet").to_pydict()
    return {
        rid: (Encoded(ids, labels), trunc, lost)
        for rid, ids, labels, trunc, lost in zip(
            table["id"], table["input_ids"], table["labels"], table["truncated"], table["response_tokens_lost"]
        )
    }
