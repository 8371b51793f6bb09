"""The report's picture of forgetting during training: per suite, each validated checkpoint as a point, its task
gain (validation NLL fallen since step 0) against its suite change (the suite's NLL risen since step 0), red where
a blocking budget was broken, ringed where it is the step exported; the same figures as a table, and why that step
was chosen (train/forgetting.py)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

WIDTH, HEIGHT, PAD = 520, 300, 48


def scatter(points: Sequence[dict[str, Any]], chosen: int | None) -> str:
    """An SVG of (suite NLL change, task gain) per checkpoint, labelled by step."""
    xs, ys = [p["nll_change"] for p in points], [p["task_gain"] for p in points]
    x0, x1, y0, y1 = min(xs + [0.0]), max(xs + [0.0]), min(ys + [0.0]), max(ys + [0.0])

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            PAD + (x - x0) / ((x1 - x0) or 1) * (WIDTH - 2 * PAD),
            HEIGHT - PAD - (y - y0) / ((y1 - y0) or 1) * (HEIGHT - 2 * PAD),
        )

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img">',
        f'<rect x="{PAD}" y="{PAD}" width="{WIDTH - 2 * PAD}" height="{HEIGHT - 2 * PAD}" fill="none" stroke="#ccc"/>',
    ]
    x, y = at(0.0, 0.0)  # step 0: the base model, where every checkpoint started
    parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#888"/>')
    parts.append(f'<text x="{x + 6:.1f}" y="{y - 6:.1f}" font-size="11">0 (base)</text>')
    for p in points:
        x, y = at(p["nll_change"], p["task_gain"])
        colour = "#2ca02c" if p["within_budget"] else "#d62728"
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>')
        if p["step"] == chosen:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="9" fill="none" stroke="#000" stroke-width="2"/>')
        parts.append(f'<text x="{x + 6:.1f}" y="{y - 6:.1f}" font-size="11">{int(p["step"])}</text>')
    parts += [
        f'<text x="{PAD}" y="{HEIGHT - 12}" font-size="11">suite NLL change since step 0 (nats/token): '
        f"{x0:+.3f} … {x1:+.3f} (right: forgot more)</text>",
        f'<text x="4" y="{PAD - 10}" font-size="11">task gain (validation NLL fallen since step 0): '
        f"{y0:+.3f} … {y1:+.3f} (up: learned more)</text>",
        "</svg>",
    ]
    return "".join(parts)


def forgetting_section(rows: Sequence[dict[str, Any]], selection: dict[str, Any] | None) -> str:
    """rows: suite_curve.csv's (step 0 first); empty when no suite was scored during training."""
    if not rows:
        return ""
    chosen = selection["step"] if selection else None
    before = {r["suite"]: r for r in rows if r["step"] == 0}
    html = [
        "<h2>Forgetting during training</h2>",
        f"<p class=big>Exported step {chosen}: {escape(selection['reason'])}</p>" if selection else "",
        "<p>Each validated checkpoint: the task gain against how far the suite moved; green within every blocking "
        "suite's budget, red outside it, ringed: the step exported.</p>",
    ]
    for name in sorted(before):
        start = before[name]
        points = [
            {
                "step": r["step"],
                "task_gain": start["val_nll"] - r["val_nll"],
                "nll_change": r["nll_change"],
                "within_budget": bool(r["within_budget"]),
            }
            for r in rows
            if r["suite"] == name and r["step"] != 0 and r["val_nll"] not in ("", None)
        ]
        if not points:
            continue
        html += [f"<h3>suite {escape(name)}</h3>", scatter(points, chosen), _table(name, rows)]
    return "".join(html)


def _table(name: str, rows: Sequence[dict[str, Any]]) -> str:
    columns = ("val_nll", "nll", "nll_change", "length_ratio", "degenerate_rate", "collapsed_rate", "stop_rate")
    head = "".join(f"<th>{c}</th>" for c in ("step", *columns, "within budget"))
    body = ""
    for r in rows:
        if r["suite"] != name:
            continue
        cells = [f"{int(r['step'])}"] + [f"{r[c]:.4f}" if isinstance(r.get(c), float) else "" for c in columns]
        cells.append("yes" if r["within_budget"] else "NO")
        body += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"
