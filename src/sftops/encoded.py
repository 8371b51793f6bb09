"""A tokenised conversation as training and scoring read it: token ids and labels, IGNORE where a token is not
a target (prompt, padding, turns of weight 0)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_targets(self) -> int:
        labels = self.labels
        if isinstance(labels, list):  # list.count runs in C: the format stage asks this of every row
            return len(labels) - labels.count(IGNORE)
        return sum(label != IGNORE for label in labels)


def example_lengths(examples: Sequence[Encoded]) -> np.ndarray:
    """Token count of each example: from the offsets of an array-backed TokenRows, without building its rows."""
    lengths = getattr(examples, "lengths", None)
    if lengths is not None:
        return np.asarray(lengths, dtype=np.int64)
    return np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))
