"""A self-contained HTML review of one fine-tuned model: headline numbers with the confidence interval of the
improvement, how the answers changed (length, degenerate answers, stop rate, text metrics) against their behaviour
budgets, the loss curves (inline SVG), per-source results, the promotion decision, the rows the model improved
most and least, and the generations next to their references. No external files or scripts."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from sftops.evaluate.cost import cost_line
from sftops.evaluate.feedback_report import feedback_section
from sftops.evaluate.forgetting_report import forgetting_section


def svg_curves(series: dict[str, Sequence[tuple[float, float]]], width: int = 640, height: int = 260) -> str:
    """A line chart of named (x, y) series, with axis ranges printed; empty series are skipped."""
    series = {name: pts for name, pts in series.items() if pts}
    if not series:
        return "<p>(no loss curves recorded)</p>"
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    pad = 40

    def px(x: float, y: float) -> str:
        sx = pad + (x - x0) / ((x1 - x0) or 1) * (width - 2 * pad)
        sy = height - pad - (y - y0) / ((y1 - y0) or 1) * (height - 2 * pad)
        return f"{sx:.1f},{sy:.1f}"

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
        f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" stroke="#ccc"/>',
    ]
    for i, (name, pts) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        coords = " ".join(px(x, y) for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>')
        parts += [
            f'<circle cx="{c.split(",")[0]}" cy="{c.split(",")[1]}" r="3" fill="{colour}"/>'
            for c in coords.split()[:50]
            if len(pts) < 50
        ]
        parts.append(
            f'<text x="{width - pad - 150}" y="{pad + 16 + 16 * i}" fill="{colour}" '
            f'font-size="12">{escape(name)}</text>'
        )
    parts.append(f'<text x="{pad}" y="{height - 10}" font-size="11">step {x0:g} … {x1:g}</text>')
    parts.append(
        f'<text x="4" y="{pad - 8}" font-size="11">{y1:.3f}</text><text x="4" y="{height - pad}" '
        f'font-size="11">{y0:.3f}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else escape(str(v))

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# Around the promotion decision in the report: the evaluate stage writes the gate's preview there, the promote step
# puts its decision in its place in the evaluation run's copy (with_decision).
DECISION_START, DECISION_END = "<!-- promotion decision -->", "<!-- /promotion decision -->"


def decision_html(decision: dict[str, Any] | None) -> str:
    shown = "<p>(no promotion decision)</p>"
    if decision:
        shown = f"<p class=big>Registry: <b>{escape(decision['alias'])}</b> — {escape(decision['reason'])}</p>"
    return f"{DECISION_START}{shown}{DECISION_END}"


def with_decision(html: str, decision: dict[str, Any]) -> str:
    """The report with `decision` where the preview was (a report without the markers is returned as it was)."""
    start, end = html.find(DECISION_START), html.find(DECISION_END)
    if start < 0 or end < start:
        return html
    return html[:start] + decision_html(decision) + html[end + len(DECISION_END) :]


def render(
    title: str,
    metrics: dict[str, Any],
    curves: dict[str, Sequence[tuple[float, float]]],
    row_nll: Sequence[dict[str, Any]],
    generations: dict[str, list],
    decision: dict[str, Any] | None,
    suite_worst: dict[str, list[dict[str, Any]]] | None = None,
    n_extreme: int = 5,
    suite_curve: Sequence[dict[str, Any]] = (),
    feedback: dict[str, Any] | None = None,
) -> str:
    """row_nll: one dict per test row with prompt, reference, base_nll, tuned_nll (mean per response token);
    suite_worst: per regression suite, its sampled rows that got most worse (prompt, reference, both outputs);
    suite_curve: the suites at every validation during training (train/curves.py:read_suite_rows); feedback: the
    reviewers' preferences on the version's answers so far (evaluate/preference.py:summarize), shown when any."""
    base, tuned = metrics["base"], metrics["tuned"]
    level = round(100 * metrics.get("confidence", 0.95))
    headline = (
        f"<p class=big>Held-out response NLL: base <b>{base['nll']:.4f}</b> → tuned <b>{tuned['nll']:.4f}</b> "
        f"nats/token (perplexity {base['perplexity']:.2f} → {tuned['perplexity']:.2f}) on {metrics['test_rows']} test "
        f"rows.</p><p class=big>Improvement {metrics['nll_improvement']:+.4f} nats/token, {level}% paired-bootstrap CI "
        f"[{metrics['nll_improvement_ci_low']:+.4f}, {metrics['nll_improvement_ci_high']:+.4f}]; the tuned model has "
        f"the lower NLL on {100 * metrics['win_rate']:.1f}% of rows.</p>"
    )
    keys = [k for k in tuned if k in base]
    summary = _table(["metric", "base", "tuned"], [[k, base[k], tuned[k]] for k in keys])
    sources = metrics.get("per_source", {})
    per_source = _table(
        ["source", "rows", "base NLL", "tuned NLL", "improvement", "CI low", "CI high", "win rate"],
        [
            [
                s,
                v["rows"],
                v["base_nll"],
                v["tuned_nll"],
                v["nll_improvement"],
                v["nll_improvement_ci_low"],
                v["nll_improvement_ci_high"],
                v["win_rate"],
            ]
            for s, v in sources.items()
        ],
    )
    gate = decision_html(decision)
    ranked = sorted(row_nll, key=lambda r: r["base_nll"] - r["tuned_nll"], reverse=True)
    cols = ["prompt", "reference", "base NLL", "tuned NLL", "improvement"]

    def extreme(rows: Sequence[dict[str, Any]]) -> str:
        return _table(
            cols,
            [
                [r["prompt"][:300], r["reference"][:300], r["base_nll"], r["tuned_nll"], r["base_nll"] - r["tuned_nll"]]
                for r in rows
            ],
        )

    gen_cols = [c for c in generations if c not in ("id",)]
    gen_rows = list(zip(*(generations[c] for c in gen_cols))) if gen_cols else []
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0;font-size:13px}}
td,th{{border:1px solid #ccc;padding:4px 6px;vertical-align:top;white-space:pre-wrap;max-width:380px}}
th{{background:#f4f4f4}}.big{{font-size:16px}}</style></head><body>
<h1>{escape(title)}</h1>
<h2>Did fine-tuning help?</h2>{headline}{gate}
{feedback_section(feedback)}
{cost_section(metrics.get("cost"), decision)}
<h2>Test metrics</h2>{summary}
{behaviour_section(metrics)}
{forgetting_section(suite_curve, metrics.get("selection"))}
<h2>Per source</h2>{per_source}
{suites_section(metrics.get("suites", {}), suite_worst or {})}
<h2>Loss curves</h2>{svg_curves(curves)}
<h2>Rows improved most</h2>{extreme(ranked[:n_extreme])}
<h2>Rows improved least (or made worse)</h2>{extreme(ranked[::-1][:n_extreme])}
<h2>Generations ({len(gen_rows)})</h2>{_table(gen_cols, gen_rows)}
</body></html>
"""


def cost_section(cost: dict[str, Any] | None, decision: dict[str, Any] | None) -> str:
    """What the training run cost, beside what it bought: per 0.1 nats of test NLL over the base and the champion."""
    line = cost_line(cost, decision)
    return f"<h2>What it cost</h2><p class=big>{escape(line)}</p>" if line else ""


def _budget_verdict(block: dict[str, Any], metric: str, informational: bool) -> str:
    if metric not in block.get("broken", []):
        return "within budget"
    return "BROKEN (informational)" if informational else "BROKEN: blocks promotion"


def behaviour_rows(where: str, block: dict[str, Any], informational: bool = False) -> list[list[Any]]:
    """One evaluation set's behaviour block as rows: figure, base (or reference), tuned, change or ratio, its CI,
    the budget and whether it holds (only the figures the gate checks have a budget)."""

    def row(figure: str, before: str, after: str, change: str, budget: str = "") -> list[Any]:
        if change not in block:
            return [where, figure, block.get(before, ""), block.get(after, ""), "(not measured)", "", "", "", ""]
        limit = block.get(budget) if budget else None
        verdict = "" if limit is None else _budget_verdict(block, change, informational)
        return [
            where,
            figure,
            block[before],
            block[after],
            block[change],
            block[f"{change}_ci_low"],
            block[f"{change}_ci_high"],
            "" if limit is None else limit,
            verdict,
        ]

    gated = block.get("gated_length_ratio")
    reasons = block["degenerate_reasons"]
    counts = "; ".join(f"{who} " + "/".join(str(n) for n in reasons[who].values()) for who in ("base", "tuned"))
    rows = [
        row(
            "words per answer, ratio tuned / base",
            "words_mean_base",
            "words_mean_tuned",
            "length_ratio",
            "min_length_ratio" if gated == "length_ratio" else "",
        ),
        row(
            "words per answer, ratio tuned / reference (base column: the reference)",
            "words_mean_reference",
            "words_mean_tuned",
            "length_ratio_to_reference",
            "min_length_ratio" if gated == "length_ratio_to_reference" else "",
        ),
        row(
            f"share of degenerate answers, rise (empty/loop/unstopped: {counts})",
            "degenerate_rate_base",
            "degenerate_rate_tuned",
            "degenerate_rise",
            "max_degenerate_rise",
        ),
        row(
            "share of collapsed answers (empty or looping), rise",
            "collapsed_rate_base",
            "collapsed_rate_tuned",
            "collapsed_rise",
            "max_degenerate_rise",
        ),
        row("stop rate (ended their turn), change", "stop_rate_base", "stop_rate_tuned", "stop_rate_change"),
    ]
    for metric in ("exact_match", "rouge_l", "chrf"):
        if f"{metric}_change" in block:
            rows.append(row(f"{metric}, change", f"{metric}_base", f"{metric}_tuned", f"{metric}_change"))
    return rows


def behaviour_section(metrics: dict[str, Any]) -> str:
    """How fine-tuning changed the answers, beside what it did to the NLL: the test split and each suite, base
    against tuned on the same sampled prompts, each change with its paired-bootstrap CI and its budget."""
    sets = [("test split", metrics.get("behaviour", {}), False)] + [
        (f"suite {name}", v.get("behaviour", {}), v["informational"]) for name, v in metrics.get("suites", {}).items()
    ]
    rows = [r for where, block, informational in sets if block for r in behaviour_rows(where, block, informational)]
    if not rows:
        return "<h2>Behaviour</h2><p>(no answers generated: set evaluate.num_generations > 0)</p>"
    level = round(100 * metrics.get("confidence", 0.95))
    header = ["set", "figure", "base", "tuned", "change or ratio", f"{level}% CI low", f"{level}% CI high"]
    return (
        "<h2>Behaviour</h2><p>How the answers changed, base against tuned on the same sampled prompts: a ratio of "
        "mean words (the test split against its references cut to max_new_tokens tokens, a suite against the base "
        "model), the share of degenerate answers (fewer than 2 words, a word n-gram repeated 3 or more times in a "
        "row, or cut off by max_new_tokens), the stop rate and the text metrics. A budget is broken when the whole "
        "confidence interval lies beyond it.</p>" + _table([*header, "budget", "verdict"], rows)
    )


def _verdict(v: dict[str, Any]) -> str:
    if v["regressed"]:
        verdict = "REGRESSED (informational)" if v["informational"] else "REGRESSED: blocks promotion"
    else:
        verdict = "no regression" + (" (informational)" if v["informational"] else "")
    broken = v.get("behaviour", {}).get("broken", [])
    return verdict + (f"; behaviour budget broken: {', '.join(broken)}" if broken else "")


def suites_section(suites: dict[str, dict[str, Any]], worst: dict[str, list[dict[str, Any]]]) -> str:
    """What fine-tuning did elsewhere: each regression suite base against tuned, its verdict, and the rows that
    got most worse with both answers side by side."""
    if not suites:
        return ""
    header = [
        "suite",
        "rows",
        "excluded (train duplicates)",
        "contaminated prompts",
        "metric",
        "base",
        "tuned",
        "change CI low",
        "change CI high",
        "margin",
        "verdict",
        "base NLL",
        "tuned NLL",
        "win rate",
        "base stop rate",
        "tuned stop rate",
        "base words",
        "tuned words",
    ]
    rows = [
        [
            name,
            v["rows"],
            v["train_duplicates"],
            v["contaminated_prompts"],
            v["primary_metric"],
            v["base"][v["primary_metric"]],
            v["tuned"][v["primary_metric"]],
            v["delta_ci_low"],
            v["delta_ci_high"],
            v["regression_margin"],
            _verdict(v),
            v["base"]["nll"],
            v["tuned"]["nll"],
            v["win_rate"],
            v["base"].get("stopped_rate", ""),
            v["tuned"].get("stopped_rate", ""),
            v["base"].get("response_words_mean", ""),
            v["tuned"].get("response_words_mean", ""),
        ]
        for name, v in suites.items()
    ]
    parts = [
        "<h2>Regression suites</h2><p>Base against tuned on evaluation sets never trained on; a suite regresses "
        "when the whole confidence interval of (tuned - base) lies on the worse side of its margin.</p>",
        _table(header, rows),
    ]
    cols = ["prompt", "reference", "base answer", "tuned answer", "base NLL", "tuned NLL"]
    for name, picked in worst.items():
        parts.append(f"<h3>{escape(name)}: rows that got most worse</h3>")
        parts.append(
            _table(
                cols,
                [
                    [
                        r["prompt"][:300],
                        r["reference"][:300],
                        r["base_output"],
                        r["tuned_output"],
                        r["base_nll"],
                        r["tuned_nll"],
                    ]
                    for r in picked
                ],
            )
        )
    return "".join(parts)
