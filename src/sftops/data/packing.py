"""Padding-free batches: several examples in one row, each attending only to itself (the model builds the
block-diagonal mask from the position ids; sftops.train.packing_check proves it on the real model)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sftops.encoded import IGNORE, Encoded


def pack(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Padding-free: the examples concatenated into one row, position ids restarting at 0 for each, and no
    attention mask, from which the model builds a block-diagonal causal mask (attention never crosses an
    example boundary; see packing_self_check). Each example's first token predicts nothing of the previous
    example: its label is masked, exactly as position 0 of an unpacked row never enters the loss."""
    ids, labels, positions = [], [], []
    for e in examples:
        ids += e.input_ids
        labels += [IGNORE] + e.labels[1:]
        positions += range(len(e.input_ids))
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
    }
