"""`sftops review summary` and `sftops review export-suite`: the reviewers' feedback on a version's answers (the
`preference` assessments on its answer traces, docs/review.md), summed up, and the prompts where the tuned answer
lost written as a suite. Each subcommand is a parser function that sets `run`, which cli.main calls."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sftops.config import EvaluateConfig

TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
MODEL_HELP = "models:/NAME/VERSION or models:/NAME@ALIAS (models:/ may be left out)"


def _store(args: argparse.Namespace) -> str:
    from sftops.tracking.store import tracking_uri

    return args.tracking_uri or tracking_uri()


def _evaluate_section(params: str) -> EvaluateConfig:
    """The bootstrap settings of the project's params.yaml when there is one, evaluate's defaults otherwise (a
    reviewer's machine without the project)."""
    from sftops.config import load_config

    return load_config(params).evaluate if Path(params).exists() else EvaluateConfig()


# summary


def summary(args: argparse.Namespace) -> None:
    from sftops.evaluate.preference import summary_lines
    from sftops.tracking.feedback import version_of, version_summary

    store = _store(args)
    name, version = version_of(args.model, store)
    found = version_summary(store, name, version, _evaluate_section(args.params))
    print(json.dumps(found, indent=2) if args.json else "\n".join([found["model"], *summary_lines(found)]))


def add_summary(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "summary",
        help="the reviewers' preferences on a version's answers: rows labelled, win rate with its CI, what lost",
    )
    command.add_argument("model", metavar="MODEL_URI", help=MODEL_HELP)
    command.add_argument("--json", action="store_true", help="print the summary as JSON")
    command.add_argument("--params", default="params.yaml", help="bootstrap settings from (default: params.yaml)")
    command.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    command.set_defaults(run=summary)


# export-suite


def export_suite(args: argparse.Namespace) -> None:
    from sftops.evaluate.hard_cases import hard_case_lines, suite_path, write_suite
    from sftops.tracking.feedback import version_of, version_rows

    store = _store(args)
    name, version = version_of(args.model, store)
    path = suite_path(args.name, Path(args.folder))
    lines = hard_case_lines(version_rows(store, name, version))
    write_suite(path, lines, f"models:/{name}/{version}", args.replace)
    print(
        f"{path}: {len(lines)} prompts where the tuned answer of models:/{name}/{version} lost. Score it in later "
        f"runs: add to params.yaml under evaluate.suites\n  - name: {args.name}\n    path: {path.as_posix()}\n"
        f"and version it: dvc add {path.as_posix()} (docs/review.md)"
    )


def add_export_suite(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "export-suite", help="write the labelled prompts where the tuned answer lost as a suite under data/suites/"
    )
    command.add_argument("model", metavar="MODEL_URI", help=MODEL_HELP)
    command.add_argument("--name", default="hard-cases", help="the suite's name and file name (default: hard-cases)")
    command.add_argument("--folder", default="data/suites", help="where the suite file goes (default: data/suites)")
    command.add_argument("--replace", action="store_true", help="write the file again if it exists")
    command.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    command.set_defaults(run=export_suite)


def add_feedback_commands(commands: argparse._SubParsersAction) -> None:
    add_summary(commands)
    add_export_suite(commands)
