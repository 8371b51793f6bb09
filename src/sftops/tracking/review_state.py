"""A version's review: the human verdict, kept as tags on the registered version so the MLflow UI can set and
show it. `review` is approved or rejected (absent: pending), `review.by` who set it (stamped by the tracking
server from the authenticated user where it runs sftops' review app: tracking/review_server.py) and
`review.reason` why. The promotion gate reads the state (evaluate/promotion.py decide)."""

from __future__ import annotations

from collections.abc import Mapping

REVIEW, REVIEW_BY, REVIEW_REASON = "review", "review.by", "review.reason"
APPROVED, REJECTED, PENDING = "approved", "rejected", "pending"
VERDICTS = (APPROVED, REJECTED)  # the values a reviewer may set; anything else is refused (the CLI, the server)


def review_state(tags: Mapping[str, str]) -> str:
    """approved, rejected or pending (no verdict, or a value that is no verdict: it approves nothing)."""
    value = (tags.get(REVIEW) or "").strip().lower()
    return value if value in VERDICTS else PENDING


def reviewed_by(tags: Mapping[str, str]) -> str:
    """Who set the verdict, and why, as one phrase: "by alice: answers read fine" ("" when pending)."""
    if review_state(tags) == PENDING:
        return ""
    who = tags.get(REVIEW_BY) or "an unrecorded reviewer"
    why = tags.get(REVIEW_REASON)
    return f"by {who}" + (f": {why}" if why else "")
