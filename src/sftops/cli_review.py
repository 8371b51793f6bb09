"""`sftops review`: what the reviewer's commands do (their parsers are in cli.py, which every stage imports; this
module is imported only when a review command runs). A verdict on a registered version (approve, reject), the
promotion gate applied again with it (promote), and what waits for a verdict (status)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from sftops.config import load_config


def _tracking(args: argparse.Namespace) -> str:
    from sftops.tracking.store import tracking_uri

    return args.tracking_uri or tracking_uri()


def verdict(args: argparse.Namespace) -> None:
    """approve, reject: the version's review tags, set as the authenticated user."""
    from sftops.tracking.registry import registered_version
    from sftops.tracking.review_state import APPROVED, REJECTED, REVIEW_BY
    from sftops.tracking.reviews import set_verdict

    store = _tracking(args)
    name, version = registered_version(args.model, store)
    given = {"approve": APPROVED, "reject": REJECTED}[args.review_command]
    tags = set_verdict(store, name, version, given, args.reason)
    print(
        f"models:/{name}/{version}: {given} by {tags.get(REVIEW_BY, '?')} ({args.reason}); the gate applies it "
        f"with: sftops review promote models:/{name}/{version}"
    )


def promote(args: argparse.Namespace) -> None:
    """The promotion gate applied again to a registered, evaluated version, with its review state."""
    from sftops.tracking.registry import promote_registered, registered_version

    store = _tracking(args)
    name, version = registered_version(args.model, store)
    decision = promote_registered(store, name, version, load_config(args.params, args.overrides))
    print(f"models:/{name}/{version}: {decision.alias}: {decision.reason}")


def status(args: argparse.Namespace) -> None:
    """The versions awaiting a verdict, and a champion alias the gate did not set."""
    from sftops.tracking.reviews import awaiting_review, champion_check

    store = _tracking(args)
    name = args.name or load_config(args.params, args.overrides).tracking.registered_model_name
    waiting = awaiting_review(store, name)
    print(f"{name}: {len(waiting)} version{'s' if len(waiting) != 1 else ''} passed the gate and await review")
    for found in waiting:
        print(f"  v{found.version}  {found.decision}: {found.reason}")
    print(champion_check(store, name) or f"{name}: the champion alias is where the gate put it (or there is none)")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "approve": verdict,
    "reject": verdict,
    "promote": promote,
    "status": status,
}


def run_review(args: argparse.Namespace) -> None:
    COMMANDS[args.review_command](args)
