"""Start-up self-check for padding-free packing: the same rows scored packed and padded must give the same
per-example losses with the attention implementation actually in use. If attention leaked across packed
examples (a mask built without the per-example position ids), the losses would differ and training on packed
rows would silently optimise a different objective."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sftops.data.batching import make_batch
from sftops.encoded import Encoded
from sftops.errors import TrainingError
from sftops.train.loss import SupervisedNLL, autocast


def per_example_nll(
    model: torch.nn.Module, examples: Sequence[Encoded], pad_id: int, device: torch.device, packed: bool
) -> list[float]:
    batch = make_batch(examples, pad_id, packed, source_ids=list(range(len(examples))))
    inputs = {
        k: v.to(device) for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask", "position_ids")
    }
    with torch.no_grad(), autocast(device):
        token_nll, _ = SupervisedNLL(model)(**inputs)
    sums = torch.zeros(len(examples), dtype=torch.float64)
    sums.index_add_(0, batch["token_source"], token_nll.double().cpu())
    return sums.tolist()


def packing_self_check(
    model: torch.nn.Module,
    examples: Sequence[Encoded],
    pad_id: int,
    device: torch.device,
    attn_implementation: str,
    n: int = 4,
) -> float:
    """Raise TrainingError if packed and padded per-example losses differ; returns the largest relative gap."""
    sample = list(examples[:n])
    if len(sample) < 2:
        return 0.0
    was_training = model.training
    model.eval()  # dropout off: both passes must see the same function
    padded = per_example_nll(model, sample, pad_id, device, packed=False)
    packed = per_example_nll(model, sample, pad_id, device, packed=True)
    model.train(was_training)
    gap = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(padded, packed))
    tolerance = 2e-2 if device.type == "cuda" else 1e-4  # bf16 autocast on GPUs, float32 on CPU
    if gap > tolerance:
        raise TrainingError(
            f"packing self-check failed: per-example losses packed and padded differ by up to {gap:.2e} (relative) "
            f"with model.attn_implementation={attn_implementation}, so packed examples would attend to each other; "
            "set train.packing=false (or model.attn_implementation=sdpa)"
        )
    return gap
