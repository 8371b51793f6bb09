"""Stage 2, format: map raw rows to canonical conversations (rejecting, with a reason per row, what cannot be
trained on), remove exact and near duplicates, sample and weight the sources, split by a seeded hash of the
prompt, tokenise with the real tokenizer (length statistics, the max_length policy, the mask self-check),
and write the curated Parquet splits, the tokenised cache, the rejected rows, stats.json and the data card.
For every source: read = rejected at ingest + rejected here + duplicates + sampled out + dropped for length
or no target + kept."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from sftops.config import Config
from sftops.data.card import write_card
from sftops.data.dedup import near_duplicates, normalise
from sftops.data.schemas import RowError, to_conversation
from sftops.data.selfcheck import self_check
from sftops.data.split import contamination, prompt_text, split_of
from sftops.data.store import SPLITS, cache_key, split_file, write_cache, write_rows
from sftops.data.tokenize import Renderer, encode_batch, fit, length_summary, token_lengths
from sftops.errors import DataError
from sftops.ingest import REJECTED as RAW_REJECTED
from sftops.ingest import REPORT as RAW_REPORT
from sftops.jsonio import read_json, read_jsonl, require, write_json, write_jsonl

__all__ = ["RowError", "to_messages", "assign_split", "prompt_key", "row_id", "run_format", "SPLITS", "STATS"]

STATS = "stats.json"
REJECTED = "rejected.jsonl"

Message = dict[str, Any]


def to_messages(fields: dict[str, Any]) -> list[Message]:
    """The canonical messages of a raw row (schema detected); RowError with the reason when it fits none."""
    return to_conversation(fields)["messages"]


def prompt_key(messages: list[Message]) -> str:
    """Everything before the final response, exactly: rows with the same prompt share references."""
    return json.dumps(messages[:-1], ensure_ascii=False, sort_keys=True)


def assign_split(messages: list[Message], seed: int, val_fraction: float, test_fraction: float) -> str:
    return split_of(prompt_text(messages), seed, val_fraction, test_fraction)


def row_id(messages: list[Message], tools: list | None = None) -> str:
    body = {"messages": messages, "tools": tools} if tools else messages
    return hashlib.sha256(json.dumps(body, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


def conversation_text(messages: list[Message]) -> str:
    return normalise("\n".join(f"{m['role']} {m['content']} {json.dumps(m.get('tool_calls') or '')}" for m in messages))


def ingest_kind(reason: str) -> str:
    """The counted category of an ingest rejection reason."""
    if reason.startswith("row is a"):
        return "row not an object"
    if reason.startswith("row has"):
        return "wrong number of CSV fields"
    return reason.split(" (")[0].split(":")[0]


def _seeded_rank(seed: int, rid: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{rid}".encode()).digest()


def check_tools_render(render: Renderer, rows: list[dict[str, Any]]) -> None:
    """Tool definitions and calls must appear in the rendering, or the model would train without them."""
    for row in rows:
        names = [t.get("function", t).get("name") for t in row["tools"] or [] if isinstance(t, dict)]
        calls = [c["function"]["name"] for m in row["messages"] for c in m.get("tool_calls") or []]
        if not names and not calls:
            continue
        text = render(row["messages"], row["tools"])
        missing = [n for n in names + calls if n and n not in text]
        if missing:
            raise DataError(
                f"{row['origin']}: the chat template does not render tools/tool calls ({missing} missing from the "
                "rendered text); use a model whose template supports tools, or remove these rows"
            )


def run_format(cfg: Config) -> dict[str, Any]:
    from sftops.modeling import load_tokenizer

    raw, out = Path(cfg.paths.raw), Path(cfg.paths.curated)
    ingest = read_json(require(raw / RAW_REPORT, "ingest"))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    d = cfg.data
    rejected: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    per_source: dict[str, Counter[str]] = {}
    for rec in read_jsonl(raw / RAW_REJECTED):
        kind = ingest_kind(rec["reason"])
        rejected.append({"stage": "ingest", "kind": kind, **rec})
        reasons[kind] += 1

    # 1. schemas and row validation
    rows: list[dict[str, Any]] = []
    for source in d.sources:
        counts = per_source.setdefault(source.name, Counter())
        counts["read"] = ingest["sources"][source.name]["read"]
        counts["rejected_ingest"] = ingest["sources"][source.name]["rejected"]
        for raw_row in read_jsonl(require(raw / f"{source.name}.jsonl", "ingest")):
            try:
                conv = to_conversation(raw_row["fields"], source.row_schema, source.fields)
            except RowError as exc:
                rejected.append({"stage": "format", "source": source.name, "origin": raw_row["origin"], "kind": exc.kind, "reason": str(exc)})
                reasons[exc.kind] += 1
                counts["rejected_format"] += 1
                continue
            rows.append({"id": row_id(conv["messages"], conv["tools"]), "source": source.name, "origin": raw_row["origin"],
                         "split_as": source.split_as, **conv})

    tokenizer = load_tokenizer(cfg.model)
    render = Renderer(tokenizer)
    check_tools_render(render, rows)

    # 2. exact duplicates (normalised text), then near-duplicates (MinHash); the first copy is kept
    texts = [conversation_text(r["messages"]) for r in rows]
    first: dict[str, int] = {}
    unique: list[int] = []
    duplicates: list[tuple[int, int, str]] = []
    for i, text in enumerate(texts):
        key = hashlib.sha256(text.encode()).hexdigest()
        if key in first:
            duplicates.append((i, first[key], "exact duplicate"))
        else:
            first[key] = i
            unique.append(i)
    if d.near_duplicate_threshold is not None:
        near = near_duplicates([texts[i] for i in unique], d.near_duplicate_threshold, seed=d.split_seed)
        duplicates += [(unique[j], unique[k], f"near duplicate ({sim:.2f})") for j, (k, sim) in near.items()]
        unique = [i for j, i in enumerate(unique) if j not in near]
    for i, kept_i, what in duplicates:
        r = rows[i]
        rejected.append({"stage": "format", "source": r["source"], "origin": r["origin"], "kind": what.split(" (")[0],
                         "reason": f"{what} of {rows[kept_i]['origin']}", "kept_copy": rows[kept_i]["origin"]})
        reasons[what.split(" (")[0]] += 1
        per_source[r["source"]]["duplicates"] += 1
    rows = [rows[i] for i in unique]

    # 3. per-source caps (a seeded sample, stable when rows are added)
    capped = []
    for source in d.sources:
        mine = [r for r in rows if r["source"] == source.name]
        if source.max_rows is not None and len(mine) > source.max_rows:
            chosen = {r["id"] for r in sorted(mine, key=lambda r: _seeded_rank(d.split_seed, r["id"]))[: source.max_rows]}
            per_source[source.name]["sampled_out"] = len(mine) - len(chosen)
            mine = [r for r in mine if r["id"] in chosen]
        capped += mine
    rows = capped  # still in input order: rows were read source by source

    # 4. split: fixed-split sources first; any row sharing a prompt with them follows them
    fixed = {prompt_text(r["messages"]): r["split_as"] for r in rows if r["split_as"] != "auto"}
    for r in rows:
        p = prompt_text(r["messages"])
        r["split"] = r["split_as"] if r["split_as"] != "auto" else fixed.get(p) or split_of(p, d.split_seed, d.val_fraction, d.test_fraction)

    # 5. tokenise, length statistics, mask self-check, max_length policy
    convs = [{"messages": r["messages"], "tools": r["tools"]} for r in rows]
    encoded = encode_batch(tokenizer, convs, render)
    lengths = token_lengths(encoded)
    sample = random.Random(d.split_seed).sample(range(len(rows)), min(d.self_check_rows, len(rows)))
    checked = self_check(tokenizer, [(f"{rows[i]['source']} {rows[i]['origin']}", convs[i], encoded[i]) for i in sample])
    overflow = Counter()
    tokens: dict[str, list[tuple[str, Any, bool, int]]] = {s: [] for s in SPLITS}
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for r, conv, enc in zip(rows, convs, encoded):
        overflow["rows_over"] += len(enc.input_ids) > cfg.model.max_length
        fitted = fit(tokenizer, render, conv, enc, cfg.model.max_length, d.overflow, f"{r['source']} {r['origin']}")
        if fitted.encoded is None:
            kind = fitted.kind or "dropped"
            rejected.append({"stage": "format", "source": r["source"], "origin": r["origin"], "kind": kind, "reason": f"{kind}: {fitted.reason}"})
            reasons[kind] += 1
            overflow["dropped_too_long" if kind == "too long" else "dropped_no_target"] += 1
            overflow["response_tokens_lost"] += fitted.response_tokens_lost
            per_source[r["source"]]["dropped_tokens"] += 1
            continue
        overflow["truncated"] += fitted.truncated
        overflow["response_tokens_lost"] += fitted.response_tokens_lost
        row = {k: r[k] for k in ("id", "source", "origin", "split", "messages", "tools")}
        splits[r["split"]].append(row)
        tokens[r["split"]].append((r["id"], fitted.encoded, fitted.truncated, fitted.response_tokens_lost))
        per_source[r["source"]]["kept"] += 1

    # 6. mixing: a source's train rows repeated `weight` times (the fraction: a seeded sample)
    for source in d.sources:
        mine = [(row, tok) for row, tok in zip(splits["train"], tokens["train"]) if row["source"] == source.name]
        whole, frac = divmod(source.weight, 1.0)
        extra = [pair for _ in range(int(whole) - 1) for pair in mine]
        if frac > 0:
            ranked = sorted(mine, key=lambda p: _seeded_rank(d.split_seed + 1, p[0]["id"]))
            part = ranked[: round(frac * len(mine))]
            extra += part if whole >= 1 else []
            if whole < 1:  # weight below 1: keep only that fraction of the source's train rows
                drop = {p[0]["id"] for p in ranked[len(part) :]}
                keep = [(row, tok) for row, tok in zip(splits["train"], tokens["train"]) if row["id"] not in drop]
                splits["train"], tokens["train"] = [k[0] for k in keep], [k[1] for k in keep]
        splits["train"] += [p[0] for p in extra]
        tokens["train"] += [p[1] for p in extra]
        per_source[source.name]["train_rows"] = sum(row["source"] == source.name for row in splits["train"])

    # 7. contamination: test prompts whose word n-grams overlap the train prompts'
    train_prompts = [prompt_text(r["messages"]) for r in splits["train"]]
    test_prompts = [prompt_text(r["messages"]) for r in splits["test"]]
    flagged = contamination(train_prompts, test_prompts, d.contamination_ngram, d.contamination_threshold)

    for name, split_rows in splits.items():
        write_rows(split_file(out, name), split_rows)
    write_cache(out, cache_key(out, tokenizer, cfg.model.max_length, d.overflow), tokens)
    write_jsonl(out / REJECTED, rejected)

    sources = {}
    for name, c in per_source.items():
        s = {k: int(c[k]) for k in ("read", "rejected_ingest", "rejected_format", "duplicates", "sampled_out", "dropped_tokens", "kept", "train_rows")}
        accounted = s["rejected_ingest"] + s["rejected_format"] + s["duplicates"] + s["sampled_out"] + s["dropped_tokens"] + s["kept"]
        assert s["read"] == accounted, f"source {name}: read {s['read']} != {accounted} accounted for"
        sources[name] = s
    stats = {
        "read": sum(s["read"] for s in sources.values()),
        "rejected": sum(s["rejected_ingest"] + s["rejected_format"] for s in sources.values()),
        "duplicates": sum(s["duplicates"] for s in sources.values()),
        "kept": sum(s["kept"] for s in sources.values()),
        "rejected_by_reason": dict(reasons.most_common()),
        "sources": sources,
        "splits": {name: len(r) for name, r in splits.items()},
        "token_lengths": {part: length_summary(v) for part, v in lengths.items()},
        "overflow": {"policy": d.overflow, "max_length": cfg.model.max_length,
                     **{k: int(overflow[k]) for k in ("rows_over", "dropped_too_long", "truncated", "response_tokens_lost", "dropped_no_target")}},
        "contamination": {
            "ngram": d.contamination_ngram, "threshold": d.contamination_threshold, "test_prompts": len(test_prompts),
            "flagged": len(flagged),
            "examples": [{"origin": splits["test"][i]["origin"], "overlap": round(o, 4)} for i, o in flagged[:20]],
        },
        "self_check": {"rows": checked},
        "ingest": ingest,
    }
    write_json(out / STATS, stats)
    write_card(out, stats, lengths, cfg.model.max_length)
    return stats
