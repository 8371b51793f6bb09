"""A "hard cases" suite from the reviewers' labels: the prompts where they preferred the base answer to the tuned one,
written as a suite file (one JSON object per line, `prompt` and `completion`: the reference the evaluation scored the
answers against) that params.yaml's evaluate.suites scores in later runs like any suite (evaluate/suites.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sftops.errors import ConfigError, DataError
from sftops.evaluate.preference import LabelledRow, lost, merged

SUITES_FOLDER = Path("data/suites")  # where the project's suites live (a dependency of the evaluate stage)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def hard_case_lines(rows: Sequence[LabelledRow]) -> list[dict[str, Any]]:
    """One suite row per prompt where the tuned answer lost (evaluate/preference.py:lost), in the order the rows
    came: its prompt, its reference as the completion, and where it came from (trace, suite, the reviewers'
    reasons), which the suite reader leaves aside."""
    return [
        {
            "prompt": r.prompt,
            "completion": r.reference,
            "trace_id": r.trace_id,
            "from_suite": r.suite,
            "rationale": " | ".join(f"{p['reviewer']}: {p['rationale']}" for p in r.preferences if p["rationale"]),
        }
        for r in lost(merged(rows))
        if r.prompt and r.reference
    ]


def suite_path(name: str, folder: Path = SUITES_FOLDER) -> Path:
    if not _NAME.match(name):
        raise ConfigError(f"suite name {name!r}: use letters, digits, '_', '.' or '-' (e.g. hard-cases)")
    return folder / f"{name}.jsonl"


def write_suite(path: Path, lines: list[dict[str, Any]], model: str, replace: bool) -> Path:
    """The suite file; stops with one line when nothing lost or the file exists (unless `replace`)."""
    if not lines:
        raise DataError(
            f"{model}: no labelled prompt where the tuned answer lost; add `preference` feedback (tuned | base | tie) "
            "in the MLflow UI's Traces view first (docs/review.md)"
        )
    if path.exists() and not replace:
        raise ConfigError(f"{path} exists; choose another --name, or pass --replace to write it again")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return path
