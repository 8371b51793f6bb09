"""The training and validation loss curves as small CSV files next to the model (DVC plots read them, the
HTML report draws them)."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from sftops.layout import TRAIN_CURVE, VAL_CURVE


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
