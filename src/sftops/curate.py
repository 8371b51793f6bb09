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
from collections import Counter
from pathlib import Path
from typing import Any

from sftops.config import Config, DataConfig, SourceConfig
from sftops.data.card import write_card
from sftops.data.dedup import near_duplicates, normalise
from sftops.data.schemas import RowError, to_conversation
from sftops.data.selfcheck import self_check
from sftops.data.split import contamination, prompt_text, split_of
from sftops.data.store import SPLITS, cache_key, split_file, write_cache, write_rows
from sftops.data.tokenize import Renderer, encode_batch, fit, length_summary, token_lengths
from sftops.errors import DataError
from sftops.fingerprints import remember_digests
from sftops.ingest import REJECTED as RAW_REJECTED
from sftops.ingest import REPORT as RAW_REPORT
from sftops.ingest import ingest_kind, refuse_empty
from sftops.jsonio import read_json, read_jsonl, require, write_json, write_jsonl
from sftops.outputs import replaced_whole

__all__ = ["RowError", "to_messages", "assign_split", "prompt_key", "row_id", "run_format", "SPLITS", "STATS"]

STATS = "stats.json"
REJECTED = "rejected.jsonl"
COUNTS = ("read", "rejected_ingest", "rejected_format", "duplicates", "sampled_out", "dropped_tokens", "kept", "train_rows")

Message = dict[str, Any]
Row = dict[str, Any]


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
        self.rejected.append({"stage": "format", "source": source, "origin": origin, "kind": kind, "reason": reason, **extra})
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


def map_rows(raw: Path, sources: list[SourceConfig], ledger: Ledger, stop_on_empty: bool = True) -> list[Row]:
    """Each raw row as a canonical conversation, or a rejection with its reason."""
    rows: list[Row] = []
    for source in sources:
        reasons: list[str] = []
        mapped = 0
        for raw_row in read_jsonl(raw / f"{source.name}.jsonl"):
            try:
                conv = to_conversation(raw_row["fields"], source.row_schema, source.fields, tuple(source.ignore))
            except RowError as exc:
                ledger.reject(source.name, raw_row["origin"], exc.kind, str(exc), "rejected_format")
                reasons.append(str(exc))
                continue
            mapped += 1
            ledger.unused[source.name].update(conv.pop("unused"))
            rows.append({"id": row_id(conv["messages"], conv["tools"]), "source": source.name,
                         "origin": raw_row["origin"], "split_as": source.split_as, **conv})
        if mapped == 0 and stop_on_empty:
            refuse_empty(source, ledger.counts[source.name]["read"], reasons, "format")
    return rows


def refuse_too_few(kept: dict[str, list], cfg: Config) -> None:
    """Training needs train rows and evaluation test rows: say so now, not after a model was trained."""
    d = cfg.data
    counts = {split: len(pairs) for split, pairs in kept.items()}
    split = f"{sum(counts.values())} rows kept, split train/val/test = {counts['train']}/{counts['val']}/{counts['test']}"
    if counts["train"] == 0:
        raise DataError(f"{split}: no train rows; add data, lower data.val_fraction/test_fraction or raise model.max_length "
                        f"(now {cfg.model.max_length})")
    if counts["test"] < d.min_test_rows:
        raise DataError(
            f"{split}: evaluation needs at least data.min_test_rows={d.min_test_rows} test rows; add data, raise "
            f"data.test_fraction (now {d.test_fraction}), give a source with split_as: test, or set data.min_test_rows=0 "
            "to prepare data without evaluating"
        )


CANDIDATE_MAX_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)


def rows_within(totals: list[int], max_length: int) -> dict[str, int]:
    """How many rows each candidate model.max_length would keep whole: the numbers to choose it by."""
    candidates = sorted({*CANDIDATE_MAX_LENGTHS, max_length})
    return {str(n): sum(t <= n for t in totals) for n in candidates}


def check_tools_render(render: Renderer, rows: list[Row]) -> None:
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


def remove_duplicates(rows: list[Row], threshold: float | None, seed: int, ledger: Ledger) -> list[Row]:
    """Exact duplicates of the normalised text, then near-duplicates (MinHash); the first copy is kept and
    each removed row names it."""
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
    if threshold is not None:
        near = near_duplicates([texts[i] for i in unique], threshold, seed=seed)
        duplicates += [(unique[j], unique[k], f"near duplicate ({sim:.2f})") for j, (k, sim) in near.items()]
        unique = [i for j, i in enumerate(unique) if j not in near]
    for i, kept, what in duplicates:
        ledger.reject(rows[i]["source"], rows[i]["origin"], what.split(" (")[0], f"{what} of {rows[kept]['origin']}",
                      "duplicates", kept_copy=rows[kept]["origin"])
    return [rows[i] for i in unique]


def cap_sources(rows: list[Row], sources: list[SourceConfig], seed: int, ledger: Ledger) -> list[Row]:
    """A source's max_rows: a seeded sample by row id, so the rows chosen stay chosen when rows are added."""
    capped = []
    for source in sources:
        mine = [r for r in rows if r["source"] == source.name]
        if source.max_rows is not None and len(mine) > source.max_rows:
            chosen = {r["id"] for r in sorted(mine, key=lambda r: _seeded_rank(seed, r["id"]))[: source.max_rows]}
            ledger.counts[source.name]["sampled_out"] = len(mine) - len(chosen)
            mine = [r for r in mine if r["id"] in chosen]
        capped += mine
    return capped  # still in input order: rows are read source by source


def assign_splits(rows: list[Row], d: DataConfig) -> None:
    """Fixed-split sources (split_as) first; any row sharing a prompt with them follows them; the rest by the
    seeded hash of the prompt."""
    fixed = {prompt_text(r["messages"]): r["split_as"] for r in rows if r["split_as"] != "auto"}
    for r in rows:
        p = prompt_text(r["messages"])
        if r["split_as"] != "auto":
            r["split"] = r["split_as"]
        else:
            r["split"] = fixed.get(p) or split_of(p, d.split_seed, d.val_fraction, d.test_fraction)


def apply_weights(train: list[tuple[Row, Any]], sources: list[SourceConfig], seed: int) -> list[tuple[Row, Any]]:
    """Each source's train rows repeated `weight` times; a fractional part is a seeded sample of its rows
    (weight 0.5: half of them, 2.5: all twice plus half once more)."""
    out = []
    for source in sources:
        mine = [pair for pair in train if pair[0]["source"] == source.name]
        whole, frac = divmod(source.weight, 1.0)
        ranked = sorted(mine, key=lambda p: _seeded_rank(seed + 1, p[0]["id"]))
        out += mine * int(whole) + ranked[: round(frac * len(mine))]
    return out


def run_format(cfg: Config) -> dict[str, Any]:
    from sftops.modeling import load_tokenizer

    raw = Path(cfg.paths.raw)
    for source in cfg.data.sources:
        require(raw / f"{source.name}.jsonl", "ingest")
    ingest = read_json(require(raw / RAW_REPORT, "ingest"))
    with replaced_whole(cfg.paths.curated) as out:
        return _curate(cfg, load_tokenizer(cfg.model), raw, out, ingest)


def _curate(cfg: Config, tokenizer: Any, raw: Path, out: Path, ingest: dict[str, Any]) -> dict[str, Any]:
    d = cfg.data
    ledger = Ledger(d.sources, ingest)
    ledger.add_ingest_rejections(list(read_jsonl(raw / RAW_REJECTED)))

    rows = map_rows(raw, d.sources, ledger, d.stop_on_empty_source)
    render = Renderer(tokenizer)
    check_tools_render(render, rows)
    rows = remove_duplicates(rows, d.near_duplicate_threshold, d.split_seed, ledger)
    rows = cap_sources(rows, d.sources, d.split_seed, ledger)
    assign_splits(rows, d)

    # tokens: length statistics and the self-check on the full encodings, then the max_length policy
    convs = [{"messages": r["messages"], "tools": r["tools"]} for r in rows]
    encoded = encode_batch(tokenizer, convs, render)
    lengths = token_lengths(encoded)
    sample = random.Random(d.split_seed).sample(range(len(rows)), min(d.self_check_rows, len(rows)))
    checked = self_check(tokenizer, [(f"{rows[i]['source']} {rows[i]['origin']}", convs[i], encoded[i]) for i in sample])
    overflow: Counter[str] = Counter()
    kept: dict[str, list[tuple[Row, tuple]]] = {s: [] for s in SPLITS}
    dropped: dict[str, list[str]] = {s.name: [] for s in d.sources}
    for r, conv, enc in zip(rows, convs, encoded):
        overflow["rows_over"] += len(enc.input_ids) > cfg.model.max_length
        fitted = fit(tokenizer, render, conv, enc, cfg.model.max_length, d.overflow, f"{r['source']} {r['origin']}")
        overflow["response_tokens_lost"] += fitted.response_tokens_lost
        if fitted.encoded is None:
            overflow["dropped_too_long" if fitted.kind == "too long" else "dropped_no_target"] += 1
            ledger.reject(r["source"], r["origin"], fitted.kind, f"{fitted.kind}: {fitted.reason}", "dropped_tokens")
            dropped[r["source"]].append(f"{fitted.kind}: {fitted.reason}")
            continue
        overflow["truncated"] += fitted.truncated
        overflow["prompt_tokens_cut"] += fitted.prompt_tokens_cut
        ledger.counts[r["source"]]["kept"] += 1
        row = {k: r[k] for k in ("id", "source", "origin", "split", "messages", "tools")}
        row.update(messages_as_trained=fitted.messages, prompt_tokens_cut=fitted.prompt_tokens_cut,
                   response_tokens_lost=fitted.response_tokens_lost)
        kept[r["split"]].append((row, (r["id"], fitted.encoded, fitted.truncated, fitted.response_tokens_lost)))
    for source in d.sources:  # a source wholly duplicated by another is fine; one wholly too long is not
        if ledger.counts[source.name]["kept"] == 0 and dropped[source.name] and d.stop_on_empty_source:
            refuse_empty(source, ledger.counts[source.name]["read"], dropped[source.name], "format")
    refuse_too_few(kept, cfg)
    kept["train"] = apply_weights(kept["train"], d.sources, d.split_seed)
    for source in d.sources:
        ledger.counts[source.name]["train_rows"] = sum(row["source"] == source.name for row, _ in kept["train"])

    train_prompts = [prompt_text(row["messages"]) for row, _ in kept["train"]]
    test_prompts = [prompt_text(row["messages"]) for row, _ in kept["test"]]
    flagged = contamination(train_prompts, test_prompts, d.contamination_ngram, d.contamination_threshold)

    for split, pairs in kept.items():
        write_rows(split_file(out, split), [row for row, _ in pairs])
    write_cache(out, cache_key(out, tokenizer, cfg.model.max_length, d.overflow),
                {split: [tok for _, tok in pairs] for split, pairs in kept.items()})
    write_jsonl(out / REJECTED, ledger.rejected)
    sources = ledger.per_source()
    stats = {
        "read": sum(s["read"] for s in sources.values()),
        "rejected": sum(s["rejected_ingest"] + s["rejected_format"] for s in sources.values()),
        "duplicates": sum(s["duplicates"] for s in sources.values()),
        "kept": sum(s["kept"] for s in sources.values()),
        "rejected_by_reason": dict(ledger.reasons.most_common()),
        "sources": sources,
        "unused_fields": {name: dict(c.most_common()) for name, c in ledger.unused.items() if c},
        "splits": {split: len(pairs) for split, pairs in kept.items()},
        "token_lengths": {part: length_summary(v) for part, v in lengths.items()},
        "rows_before_length": len(rows),
        "rows_kept_at_max_length": rows_within(lengths["total"], cfg.model.max_length),
        "overflow": {"policy": d.overflow, "max_length": cfg.model.max_length,
                     **{k: int(overflow[k]) for k in ("rows_over", "dropped_too_long", "truncated", "prompt_tokens_cut", "response_tokens_lost", "dropped_no_target")}},
        "contamination": {
            "ngram": d.contamination_ngram, "threshold": d.contamination_threshold, "test_prompts": len(test_prompts),
            "flagged": len(flagged),
            "examples": [{"origin": kept["test"][i][0]["origin"], "overlap": round(o, 4)} for i, o in flagged[:20]],
        },
        "self_check": {"rows": checked},
        # The stage stops on a failed check, so written stats mean passed, if any row was checked; the promotion gate reads this.
        "checks": {"mask_self_check": {"passed": checked > 0, "rows": checked}},
        "ingest": ingest,
    }
    write_json(out / STATS, stats)
    write_json(out / RAW_REPORT, ingest)  # carried along: train logs it without reading data/raw, which it does not depend on
    write_card(out, stats, lengths, cfg.model.max_length)
    remember_digests(out)  # hashed once here, so train and evaluate read the digests, not the gigabytes
    return stats
