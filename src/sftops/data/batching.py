"""From encoded examples to the micro-batches of each optimizer step: seeded order, optional length grouping,
padded rows (or packed ones: sftops.data.packing), and the share of each process under torchrun."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from sftops.data.packing import pack
from sftops.encoded import IGNORE, Encoded

Batch = dict[str, torch.Tensor]


def micro_batches(
    lengths: Sequence[int] | np.ndarray, size: int, seed: int, group_by_length: bool = False
) -> Iterator[list[int]]:
    """Index lists, one per micro-batch, epoch after epoch; each epoch is a fresh seeded shuffle.

    With group_by_length, each window of 64 micro-batches is sorted by length (stably) before it is cut, and the
    micro-batches are shuffled again: rows of similar length share a batch, so little compute goes to padding.
    The objective is unchanged (every step is weighted by its target tokens). The order is computed on arrays;
    Python lists are made only for the micro-batch being yielded."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n, epoch = len(lengths), 0
    while True:
        g = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(n, generator=g).numpy()
        if not group_by_length:
            yield from (perm[start : start + size].tolist() for start in range(0, n, size))
        else:
            window = size * 64
            chunks = []
            for w in range(0, n, window):
                part = perm[w : w + window]
                part = part[np.argsort(lengths[part], kind="stable")]
                chunks += [part[start : start + size] for start in range(0, len(part), size)]
            yield from (chunks[i].tolist() for i in torch.randperm(len(chunks), generator=g).tolist())
        epoch += 1


def step_batches(stream: Iterator[list[int]], accum: int, world: int, rank: int) -> list[list[int]]:
    """The micro-batches this process runs for one optimizer step.

    The step takes accum * world consecutive micro-batches from the shared seeded stream, and process r runs
    every world-th one from r: the step sees the same rows whatever the number of processes, so one process of
    micro-batch 8 and two processes of micro-batch 4 compute the same step."""
    taken = [next(stream) for _ in range(accum * world)]
    return taken[rank::world]


def collate(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch on the right; padding is masked from attention and from the loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_batch(
    examples: Sequence[Encoded], pad_id: int, packed: bool, source_ids: Sequence[int] | None = None
) -> Batch:
    """A padded or packed micro-batch; with source_ids (one per example), also the source of each supervised
    token in the order the objective returns them (row-major), for the per-source loss."""
    batch = pack(examples, pad_id) if packed else collate(examples, pad_id)
    if source_ids is not None:
        supervised = batch["labels"][:, 1:] != IGNORE
        if packed:
            example_of = torch.cumsum(batch["position_ids"] == 0, dim=1) - 1
        else:
            example_of = torch.arange(len(examples)).unsqueeze(1).expand_as(batch["labels"])
        batch["token_source"] = torch.tensor(source_ids)[example_of[:, 1:][supervised]]
    return batch


def step_micro_batches(
    examples: Sequence[Encoded], shares: list[list[int]], pad_id: int, packed: bool, source_of: np.ndarray
) -> list[Batch]:
    """This process's micro-batches for one step: only the rows in `shares` are taken from the examples (from
    an array-backed TokenRows, sliced out of its memory-mapped tokens), with each row's source index."""
    return [make_batch([examples[i] for i in idx], pad_id, packed, source_of[idx].tolist()) for idx in shares]
