"""`sftops review summary` and `sftops review export-suite`: the reviewers' feedback on a version's answers (the
`preference` assessments on its answer traces, docs/review.md), summed up, and the prompts where the tuned answer
lost written as a suite. The parsers are in cli.py (no stage imports this module); COMMANDS maps each to its run
function."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sftops.config import EvaluateConfig


def _store(args: argparse.Namespace) -> str:
    from sftops.tracking.store import tracking_uri

    return args.tracking_uri or tracking_uri()


def _evaluate_section(params: str) -> EvaluateConfig:
    """The bootstrap settings of the project's params.yaml when there is one, evaluate's defaults otherwise (a
    reviewer's machine without the project)."""
    from sftops.config import load_config

    return load_config(params).evaluate if Path(params).exists() else EvaluateConfig()


def _models_uri(target: str) -> str:
    """summary and export-suite also take NAME/VERSION or NAME@ALIAS, the models:/ prefix left out."""
    return target if target.startswith("models:/") else f"models:/{target}"


# summary


def summary(args: argparse.Namespace) -> None:
    from sftops.evaluate.preference import summary_lines
    from sftops.tracking.feedback import version_summary
    from sftops.tracking.registry import registered_version

    store = _store(args)
    name, version = registered_version(_models_uri(args.model), store)
    found = version_summary(store, name, version, _evaluate_section(args.params))
    print(json.dumps(found, indent=2) if args.json else "\n".join([found["model"], *summary_lines(found)]))


# export-suite


def export_suite(args: argparse.Namespace) -> None:
    from sftops.evaluate.hard_cases import hard_case_lines, suite_path, write_suite
    from sftops.tracking.feedback import version_rows
    from sftops.tracking.registry import registered_version

    store = _store(args)
    name, version = registered_version(_models_uri(args.model), store)
    path = suite_path(args.name, Path(args.folder))
    lines = hard_case_lines(version_rows(store, name, version))
    write_suite(path, lines, f"models:/{name}/{version}", args.replace)
    print(
        f"{path}: {len(lines)} prompts where the tuned answer of models:/{name}/{version} lost. Score it in later "
        f"runs: add to params.yaml under evaluate.suites\n  - name: {args.name}\n    path: {path.as_posix()}\n"
        f"and version it: dvc add {path.as_posix()} (docs/review.md)"
    )


# What `sftops review <command>` runs (its parser is in cli.py, which imports this module only when it runs).
COMMANDS = {"summary": summary, "export-suite": export_suite}
