"""The reliability suite in one command (`make reliability`): runs the tests marked `reliability` and prints
the figures they recorded during this run: bad inputs tried and rejected with a reason, faults injected and
survived, runs resumed with matching losses, rows accounted for, secrets found in outputs. Nothing in the table
is typed by hand; a figure is counted only after the assertions about it passed. Exit code: pytest's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = [
    "bad inputs tried",
    "bad inputs rejected with a reason",
    "bad inputs accepted as valid (a BOM, extra keys)",
    "bad rows rejected with file, row and reason",
    "bad files stopped with a one-line error naming them",
    "CLI runs on bad input ending without a traceback",
    "config errors refused with the fix named",
    "fuzz examples: row parser",
    "fuzz examples: schema mapping",
    "rows read",
    "rows accounted for (kept + rejected with a record)",
    "faults injected",
    "faults survived",
    "MLflow server kills survived",
    "runs resumed with matching losses",
    "unsafe model loads refused",
    "secrets planted",
    "outputs scanned for secrets (files and streams)",
    "secrets found in outputs",
]


def table(result: dict, seconds: float) -> str:
    figures, tests = result["figures"], result["tests"]
    passed = sum(outcome == "passed" for outcome in tests.values())
    rows = [(name, figures[name]) for name in ORDER if name in figures]
    rows += sorted((name, value) for name, value in figures.items() if name not in ORDER)
    rows += [("reliability tests passed", f"{passed} of {len(tests)}"), ("wall time (s)", f"{seconds:.0f}")]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'figure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    failed = [node for node, outcome in tests.items() if outcome != "passed"]
    return "\n".join(lines + [f"NOT PASSED: {node}" for node in failed])


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "figures.json"
        env = {**os.environ, "SFTOPS_RELIABILITY_JSON": str(report)}
        started = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-m",
                "reliability",
                "-q",
                "-p",
                "no:cacheprovider",
                "--durations=10",
                *argv,
            ],
            cwd=ROOT,
            env=env,
        )
        seconds = time.monotonic() - started
        if not report.exists():
            print("the reliability tests did not run (see pytest's output above)", file=sys.stderr)
            return done.returncode or 1
        print("\nReliability figures (from this run):\n")
        print(table(json.loads(report.read_text()), seconds))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
