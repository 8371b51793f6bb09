"""The report's section on the reviewers' feedback, when the version's answers have labels: rows labelled, each
preference's count, the win rate of tuned over base with its interval (a tie counts half), and the prompts where the
tuned answer lost with the reviewers' reasons (evaluate/preference.py:summarize)."""

from __future__ import annotations

from html import escape
from typing import Any


def feedback_section(summary: dict[str, Any] | None) -> str:
    """Empty without a labelled row."""
    if not summary or not summary.get("labelled"):
        return ""
    level = round(100 * summary["confidence"])
    counts = summary["labels"]
    head = (
        f"<p class=big>{summary['labelled']} of {summary['rows']} answered prompts labelled by "
        f"{escape(', '.join(summary['reviewers']))}: tuned preferred {counts['tuned']}, base {counts['base']}, tie "
        f"{counts['tie']}. Win rate of tuned over base <b>{summary['win_rate']:.3f}</b> ({level}% bootstrap CI "
        f"[{summary['win_rate_ci_low']:.3f}, {summary['win_rate_ci_high']:.3f}]; a tie counts half a win).</p>"
    )
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{escape(text)}</td>"
            for text in (
                row["suite"],
                row["prompt"][:300],
                row["base"][:300],
                row["tuned"][:300],
                "; ".join(f"{p['reviewer']}: {p['rationale']}" for p in row["rationales"]) or "(none given)",
            )
        )
        + "</tr>"
        for row in summary["lost"]
    )
    table = (
        "<table><tr><th>suite</th><th>prompt</th><th>base</th><th>tuned</th><th>why the base answer won</th></tr>"
        f"{rows}</table>"
        if rows
        else "<p>The tuned answer lost on no labelled prompt.</p>"
    )
    return f"<h2>Reviewers' preferences</h2>{head}<h3>Where the tuned answer lost ({len(summary['lost'])})</h3>{table}"
