"""The training and validation loss curves as small CSV files next to the model (DVC plots read them, the
HTML report draws them)."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sftops.layout import SUITE_CURVE, TRAIN_CURVE, VAL_CURVE


def write_curves(
    folder: Path, history: Sequence[Mapping[str, float]], val_nll_by_step: Mapping[int, float | None]
) -> None:
    """train_curve.csv: step, train_loss, learning_rate (one row per optimizer step); val_curve.csv: step, val_nll."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / TRAIN_CURVE).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "train_loss", "learning_rate"])
        writer.writerows(
            [step, rec["train_loss"], rec.get("learning_rate", "")] for step, rec in enumerate(history, start=1)
        )
    with (folder / VAL_CURVE).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "val_nll"])
        writer.writerows([step, nll] for step, nll in sorted(val_nll_by_step.items()) if nll is not None)


def read_curve(path: Path, column: str) -> list[tuple[int, float]]:
    """(step, value) points of one column; empty when the file is absent (a model trained elsewhere)."""
    if not Path(path).exists():
        return []
    with Path(path).open(newline="") as fh:
        return [(int(r["step"]), float(r[column])) for r in csv.DictReader(fh) if r.get(column) not in (None, "")]


SUITE_COLUMNS = ("nll", "nll_change", "length_ratio", "degenerate_rate", "collapsed_rate", "stop_rate", "chrf")


def write_suite_rows(folder: Path, validations: Sequence[Mapping[str, Any]]) -> None:
    """suite_curve.csv: step, suite, val_nll, within_budget (1/0: every blocking suite's budget held at that
    step), then the suite's figures; one row per suite and validation, long format, so that any suite names fit
    one DVC plot definition."""
    suites = sorted({key.split("/")[1] for v in validations for key in v if key.startswith("suite/")})
    with (folder / SUITE_CURVE).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "suite", "val_nll", "within_budget", *SUITE_COLUMNS])
        for v in validations:
            for name in suites:
                figures = [v.get(f"suite/{name}/{column}", "") for column in SUITE_COLUMNS]
                writer.writerow([v["step"], name, v.get("val_nll", ""), int(not v.get("broken")), *figures])


def read_suite_rows(path: Path) -> list[dict[str, Any]]:
    """suite_curve.csv's rows, numbers as floats; empty when the file is absent."""
    if not Path(path).exists():
        return []
    with Path(path).open(newline="") as fh:
        return [
            {k: (float(v) if k != "suite" and v not in ("", None) else v) for k, v in row.items()}
            for row in csv.DictReader(fh)
        ]
