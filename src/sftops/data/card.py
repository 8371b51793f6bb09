"""The data card: a markdown summary of what the format stage did (sources, rejections by reason, duplicates,
token lengths, overflow, split, contamination, self-check) and PNG histograms of prompt/response lengths."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sftops.layout import CARD, HISTOGRAM


def write_histograms(path: Path, lengths: dict[str, Sequence[int]], max_length: int) -> None:
    """lengths: numpy arrays best (matplotlib walks a Python list of a million ints element by element). The
    figure is drawn without pyplot, whose import alone took half a second of every format run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, part in zip(axes, ("prompt", "response")):
        values = np.asarray(lengths.get(part, ()), dtype=np.int64)
        ax.hist(values if len(values) else np.zeros(1, dtype=np.int64), bins=40, color="#4477aa")
        ax.set_title(f"{part} tokens ({len(values)} rows)")
        ax.set_xlabel("tokens")
        ax.set_ylabel("rows")
    axes[0].axvline(max_length, color="#cc3311", linestyle="--", label=f"max_length {max_length}")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def render_card(stats: dict[str, Any]) -> str:
    dropped = sum(s["dropped_tokens"] for s in stats["sources"].values())
    sampled = sum(s["sampled_out"] for s in stats["sources"].values())
    parts = [
        f"# Data card\n\n{stats['kept']} curated rows from {stats['read']} read "
        f"({stats['rejected']} rejected, {stats['duplicates']} duplicates removed, {dropped} over max_length or "
        f"without a target, {sampled} sampled out by max_rows).\n"
    ]
    parts.append(
        "## Sources\n\n"
        + _table(
            (
                "source",
                "read",
                "rejected at ingest",
                "rejected at format",
                "duplicates",
                "over max_length / no target",
                "kept",
                "train rows (after weight)",
            ),
            [
                (
                    name,
                    s["read"],
                    s["rejected_ingest"],
                    s["rejected_format"],
                    s["duplicates"],
                    s["dropped_tokens"],
                    s["kept"],
                    s["train_rows"],
                )
                for name, s in stats["sources"].items()
            ],
        )
    )
    if stats.get("unused_fields"):
        parts.append(
            "## Fields not used\n\nRow fields that reach neither the conversation nor a mapping (list them in the "
            "source's `ignore` to silence this, or map them in `fields`):\n\n"
            + _table(
                ("source", "field", "rows"),
                [(name, key, n) for name, c in stats["unused_fields"].items() for key, n in c.items()],
            )
        )
    if stats["rejected_by_reason"]:
        parts.append(
            "## Rejected rows by reason\n\n" + _table(("reason", "rows"), list(stats["rejected_by_reason"].items()))
        )
    lengths = stats["token_lengths"]
    parts.append(
        "## Token lengths\n\n"
        + _table(
            ("part", "min", "median", "p90", "p99", "max"),
            [
                (part, *(f"{lengths[part].get(k, 0):g}" for k in ("min", "median", "p90", "p99", "max")))
                for part in ("prompt", "response", "total")
                if lengths.get(part)
            ],
        )
        + f"\n\n![token lengths]({HISTOGRAM})"
    )
    o = stats["overflow"]
    parts.append(
        f"## max_length {o['max_length']}, policy `{o['policy']}`\n\n- rows over max_length: {o['rows_over']}\n"
        f"- dropped: {o['dropped_too_long']}; truncated: {o['truncated']} (prompt tokens cut from the middle of the "
        f"longest user turn: {o.get('prompt_tokens_cut', 0)}; each curated row holds the text as trained in "
        f"messages_as_trained); answer tokens of older exchanges dropped to make room: {o['response_tokens_lost']} "
        f"(a final response is never cut: a row whose response cannot fit is dropped)\n- dropped with no "
        f"supervised token: {o['dropped_no_target']}"
    )
    if stats.get("rows_kept_at_max_length"):
        parts.append(
            "## Rows that each max_length would keep (before the overflow policy)\n\n"
            + _table(
                ("model.max_length", "rows kept", "share"),
                [
                    (n, k, f"{k / max(stats['rows_before_length'], 1):.0%}")
                    for n, k in stats["rows_kept_at_max_length"].items()
                ],
            )
        )
    parts.append("## Split\n\n" + _table(("split", "rows"), list(stats["splits"].items())))
    if stats.get("warnings"):
        parts.append("## Warnings\n\n" + "\n".join(f"- {w}" for w in stats["warnings"]))
    c = stats["contamination"]
    parts.append(
        f"## Contamination\n\n{c['flagged']} of {c['test_prompts']} test prompts share at least "
        f"{c['threshold']:.0%} of their word {c['ngram']}-grams with train prompts."
        + (
            "\n\n" + _table(("test row", "overlap"), [(e["origin"], f"{e['overlap']:.2f}") for e in c["examples"]])
            if c["examples"]
            else ""
        )
    )
    parts.append(
        f"## Mask self-check\n\n{stats['self_check']['rows']} rows checked: the supervised tokens decode to exactly "
        "the assistant text plus the end-of-turn token, and the training prompt equals the inference prompt."
    )
    return "\n\n".join(parts) + "\n"


def write_card(folder: Path, stats: dict[str, Any], lengths: dict[str, Sequence[int]], max_length: int) -> Path:
    write_histograms(folder / HISTOGRAM, lengths, max_length)
    path = folder / CARD
    path.write_text(render_card(stats), encoding="utf-8")
    return path
