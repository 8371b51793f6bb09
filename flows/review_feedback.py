"""The reviewers' feedback on a version as a Prefect artifact: how many of its answered prompts reviewers labelled
in the MLflow Traces view, the preference win rate with its interval, and where the tuned answer lost (the same
summary as `sftops review summary`, tracking/feedback.py). The pipeline flow publishes it for the version it
trained; a flow run after review shows the labels so far."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact

from sftops.config import EvaluateConfig
from sftops.errors import ConfigError
from sftops.evaluate.preference import summary_lines
from sftops.tracking.feedback import version_summary
from sftops.tracking.store import store_of

HOW = (
    "Label the answers in the MLflow UI: the experiment's **Traces** tab, filter `tags.version = '{model}'`, open a "
    "trace, **Add assessment**: name `preference`, value `tuned`, `base` or `tie`, with a rationale (docs/review.md)."
)


def feedback_markdown(summary: dict[str, Any]) -> str:
    lines = summary_lines(summary)
    bullets = [line for line in lines if line.startswith("- ")]
    paragraphs = [line for line in lines if not line.startswith("- ")]
    name_version = summary["model"].removeprefix("models:/")
    return "\n\n".join(
        [
            f"## Reviewers' feedback on {summary['model']}",
            *paragraphs,
            "\n".join(bullets),
            HOW.format(model=name_version),
        ]
    )


def publish_feedback(run: dict[str, Any], e: EvaluateConfig) -> str:
    """The artifact `sft-review-feedback` for the version of the run's record (run.json); returns its markdown."""
    try:
        markdown = feedback_markdown(version_summary(store_of(run), run["registered_model"], str(run["version"]), e))
    except ConfigError as exc:  # a version with nothing evaluated: said, and the finished run stays finished
        markdown = f"## Reviewers' feedback\n\nNo answers to label: {exc}"
    create_markdown_artifact(markdown=markdown, key="sft-review-feedback", description="reviewers' preferences")
    return markdown
