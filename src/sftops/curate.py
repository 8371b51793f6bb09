"""Stage 2, format: map raw rows to the canonical conversation schema, drop what cannot be trained on (with a
reason per row), remove exact duplicates, and split train/val/test by a seeded hash of the prompt."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from sftops.config import Config
from sftops.ingest import REJECTED as RAW_REJECTED
from sftops.ingest import REPORT as RAW_REPORT
from sftops.jsonio import read_jsonl, require, write_json, write_jsonl

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "val", "test")
STATS = "stats.json"
DROPPED = "dropped.jsonl"

Message = dict[str, str]


class RowError(ValueError):
    """This row cannot become a training conversation. `kind` is the category counted in the stats;
    the message (kind: detail) is what the dropped file records for the row."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError("wrong type", f"{what} is a {type(value).__name__}, expected text")
    return value


def _from_messages(messages: Any) -> list[Message]:
    if not isinstance(messages, list):
        raise RowError("wrong type", "'messages' is not a list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError("missing field", f"message {i} lacks 'role' or 'content'")
        if m["role"] not in ROLES:
            raise RowError("unknown role", f"message {i} has role {m['role']!r} (allowed: {', '.join(ROLES)})")
        out.append({"role": m["role"], "content": _text(m["content"], f"message {i} content")})
    return out


def _from_turns(turns: Any) -> list[Message]:
    # chatterbot-style: a list of strings, alternating user and assistant, starting with the user.
    if not isinstance(turns, list):
        raise RowError("wrong type", "'conversation' is not a list of turns")
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": _text(t, f"turn {i}")} for i, t in enumerate(turns)
    ]


def _pair(prompt: Any, response: Any, what: str) -> list[Message]:
    return [
        {"role": "user", "content": _text(prompt, f"'{what[0]}'")},
        {"role": "assistant", "content": _text(response, f"'{what[1]}'")},
    ]


def to_messages(fields: dict[str, Any]) -> list[Message]:
    """Detect the row's schema and map it to messages; raise RowError with the reason when it fits none."""
    if "messages" in fields:
        messages = _from_messages(fields["messages"])
    elif "conversation" in fields:
        messages = _from_turns(fields["conversation"])
    elif "instruction" in fields and "output" in fields:
        instruction = _text(fields["instruction"], "'instruction'")
        extra = _text(fields.get("input") or "", "'input'")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = _pair(prompt, fields["output"], ("instruction", "output"))
    elif "prompt" in fields and "completion" in fields:
        messages = _pair(fields["prompt"], fields["completion"], ("prompt", "completion"))
    elif "question" in fields and "answer" in fields:
        messages = _pair(fields["question"], fields["answer"], ("question", "answer"))
    else:
        raise RowError(
            "no known schema",
            "expected 'messages', 'conversation', instruction/output, prompt/completion "
            f"or question/answer; found keys {sorted(fields)}"
        )
    if not messages:
        raise RowError("empty conversation")
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise RowError("empty message", f"message {i} ({m['role']}) is empty or whitespace")
    if messages[-1]["role"] != "assistant":
        raise RowError("no final assistant turn", "the conversation ends with a non-assistant turn: no response to learn")
    if not any(m["role"] == "user" for m in messages):
        raise RowError("no user turn")
    return messages


def prompt_key(messages: list[Message]) -> str:
    """Everything before the final response: rows with the same prompt always share a split."""
    return json.dumps(messages[:-1], ensure_ascii=False, sort_keys=True)


def assign_split(messages: list[Message], seed: int, val_fraction: float, test_fraction: float) -> str:
    digest = hashlib.sha256(f"{seed}\0{prompt_key(messages)}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def row_id(messages: list[Message]) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


def run_format(cfg: Config) -> dict[str, Any]:
    raw, out = Path(cfg.paths.raw), Path(cfg.paths.curated)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    dropped: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    reasons: Counter[str] = Counter()
    per_source: dict[str, Counter[str]] = {}
    for source in cfg.data.sources:
        counts = per_source.setdefault(source.name, Counter())
        for raw_row in read_jsonl(require(raw / f"{source.name}.jsonl", "ingest")):
            counts["in"] += 1
            origin = raw_row["origin"]
            try:
                messages = to_messages(raw_row["fields"])
            except RowError as exc:
                reason = str(exc)
                dropped.append({"source": source.name, "origin": origin, "reason": reason})
                reasons[exc.kind] += 1
                counts["dropped"] += 1
                continue
            rid = row_id(messages)
            if rid in seen:
                dropped.append({"source": source.name, "origin": origin, "reason": f"exact duplicate of {seen[rid]}"})
                reasons["exact duplicate"] += 1
                counts["dropped"] += 1
                continue
            seen[rid] = origin
            split = assign_split(messages, cfg.data.split_seed, cfg.data.val_fraction, cfg.data.test_fraction)
            splits[split].append({"id": rid, "source": source.name, "origin": origin, "messages": messages})
            counts["kept"] += 1
            counts[split] += 1
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    write_jsonl(out / DROPPED, dropped)
    ingest = json.loads((raw / RAW_REPORT).read_text())
    stats = {
        "ingest": ingest,
        "rows_in": sum(c["in"] for c in per_source.values()),
        "kept": sum(len(r) for r in splits.values()),
        "dropped": len(dropped),
        "dropped_by_reason": dict(reasons.most_common()),
        "splits": {name: len(rows) for name, rows in splits.items()},
        "sources": {name: dict(c) for name, c in per_source.items()},
        "ingest_rejected_file": str(raw / RAW_REJECTED),
    }
    assert stats["rows_in"] == stats["kept"] + stats["dropped"]
    write_json(out / STATS, stats)
    return stats
