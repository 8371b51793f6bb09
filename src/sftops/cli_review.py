"""`sftops review`: the reviewer's commands. A verdict on a registered version (approve, reject), the promotion
gate applied again with it (promote), and what waits for a verdict (status). Each subcommand is a parser function
and a run function; `add_review_commands` puts them under `sftops review`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from sftops.config import load_config

Arguments = Callable[[argparse.ArgumentParser], None]  # cli._config_arguments: --params and --set
TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"


def _tracking(args: argparse.Namespace) -> str:
    from sftops.tracking.store import tracking_uri

    return args.tracking_uri or tracking_uri()


def _command(
    commands: argparse._SubParsersAction, name: str, help_text: str, run: Callable[[argparse.Namespace], None]
) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help_text)
    command.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    command.set_defaults(run=run)
    return command


# approve, reject


def verdict(args: argparse.Namespace) -> None:
    from sftops.tracking.registry import registered_version
    from sftops.tracking.review_state import REVIEW_BY
    from sftops.tracking.reviews import set_verdict

    store = _tracking(args)
    name, version = registered_version(args.model, store)
    tags = set_verdict(store, name, version, args.verdict, args.reason)
    print(
        f"models:/{name}/{version}: {args.verdict} by {tags.get(REVIEW_BY, '?')} ({args.reason}); the gate applies "
        f"it with: sftops review promote models:/{name}/{version}"
    )


def add_verdict(commands: argparse._SubParsersAction, name: str, verdict_value: str, help_text: str) -> None:
    command = _command(commands, name, help_text, verdict)
    command.add_argument("model", metavar="MODEL_URI", help="models:/NAME/VERSION (or models:/NAME@ALIAS)")
    command.add_argument("--reason", required=True, help="why, in a line (the version's tag review.reason)")
    command.set_defaults(verdict=verdict_value)


# promote


def promote(args: argparse.Namespace) -> None:
    from sftops.tracking.registry import promote_registered, registered_version

    store = _tracking(args)
    name, version = registered_version(args.model, store)
    decision = promote_registered(store, name, version, load_config(args.params, args.overrides))
    print(f"models:/{name}/{version}: {decision.alias}: {decision.reason}")


def add_promote(commands: argparse._SubParsersAction, config_arguments: Arguments) -> None:
    command = _command(
        commands,
        "promote",
        "apply the promotion gate again to a registered, evaluated version (with its review state): the alias moves",
        promote,
    )
    command.add_argument("model", metavar="MODEL_URI", help="models:/NAME/VERSION (or models:/NAME@ALIAS)")
    config_arguments(command)


# status


def status(args: argparse.Namespace) -> None:
    from sftops.tracking.reviews import awaiting_review, champion_check

    store = _tracking(args)
    name = args.name or load_config(args.params, args.overrides).tracking.registered_model_name
    waiting = awaiting_review(store, name)
    print(f"{name}: {len(waiting)} version{'s' if len(waiting) != 1 else ''} passed the gate and await review")
    for found in waiting:
        print(f"  v{found.version}  {found.decision}: {found.reason}")
    print(champion_check(store, name) or f"{name}: the champion alias is where the gate put it (or there is none)")


def add_status(commands: argparse._SubParsersAction, config_arguments: Arguments) -> None:
    command = _command(
        commands,
        "status",
        "list the versions awaiting review, and a champion alias the gate did not set (by hand, or on a rejected "
        "version)",
        status,
    )
    command.add_argument("--name", default=None, help="registered model (default: tracking.registered_model_name)")
    config_arguments(command)


def add_review_commands(sub: argparse._SubParsersAction, config_arguments: Arguments) -> None:
    """`sftops review <command>`: each command's parser sets `run`, which cli.main calls."""
    review = sub.add_parser("review", help="review a registered version: approve, reject, promote, status")
    commands = review.add_subparsers(dest="review_command", required=True)
    add_verdict(commands, "approve", "approved", "approve a version (tags review=approved, review.by, review.reason)")
    add_verdict(commands, "reject", "rejected", "reject a version: it never becomes champion")
    add_promote(commands, config_arguments)
    add_status(commands, config_arguments)
