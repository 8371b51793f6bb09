"""The SFT objective: negative log-likelihood of the target (response) tokens, nothing else.

Sums and counts are returned separately so that callers can weight correctly: the loss of an optimizer
step is (sum of NLL over all its micro-batches) / (number of target tokens in the step)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sftops.data.batching import collate
from sftops.encoded import IGNORE, Encoded, example_lengths


def n_targets(labels: torch.Tensor) -> int:
    """Target tokens that enter the loss: a label counts when a previous position predicts it."""
    return int((labels[:, 1:] != IGNORE).sum())


def row_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed NLL of the target tokens and per-row target counts (position t predicts token t+1)."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    nll = nll.view(targets.shape)
    return nll.sum(dim=1), (targets != IGNORE).sum(dim=1)


class SupervisedNLL(torch.nn.Module):
    """The training objective as a module (so DDP can wrap it): per-token NLL of the supervised tokens only.

    The LM head runs on the supervised positions alone, not on prompt or padding positions: for a small model
    with a large vocabulary the head is most of the compute, and its logits most of the memory. Models whose
    head does more than a linear map (logit soft-capping or scaling), and sharded (FSDP) models, whose
    parameters are gathered by the whole model's forward, take the full forward instead."""

    def __init__(self, model: torch.nn.Module, full_forward: bool = False):
        super().__init__()
        self.model = model
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = causal_lm.config
        special_head = any(
            getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
        )
        plain_head = not (full_forward or special_head)
        self.decoder = causal_lm.get_decoder() if plain_head else None
        self.head = causal_lm.get_output_embeddings() if plain_head else None

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL of each supervised token, whether the model's top prediction was that token), in row-major order."""
        # use_cache=False: with a cache, transformers builds a plain causal mask and packed rows would attend
        # across example boundaries.
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": False,
        }
        targets = labels[:, 1:]
        supervised = targets != IGNORE
        if self.decoder is not None:
            hidden = self.decoder(**inputs).last_hidden_state[:, :-1][supervised]
            logits = self.head(hidden)
        else:
            logits = self.model(**inputs).logits[:, :-1][supervised]
        wanted = targets[supervised]
        nll = F.cross_entropy(logits.float(), wanted, reduction="none")
        return nll, (logits.detach().argmax(-1) == wanted)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs that support it; plain float32 elsewhere (CPU)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def score_rows(
    model: torch.nn.Module,
    examples: Sequence[Encoded],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    desc: str = "score",
) -> list[tuple[float, int]]:
    """(summed NLL, target count) for each example, in input order. Rows are batched by length to pad less."""
    model.eval()
    order = np.argsort(example_lengths(examples), kind="stable").tolist()
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start : start + batch_size]
        batch = collate([examples[i] for i in idx], pad_id)
        with autocast(device):
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ).logits
        sums, counts = row_nll(logits, batch["labels"].to(device))
        for i, s, c in zip(idx, sums.tolist(), counts.tolist()):
            out[i] = (s, int(c))
    return out


def mean_nll(scores: Sequence[tuple[float, int]]) -> float:
    """Token-weighted mean, the same quantity as the training objective."""
    tokens = sum(c for _, c in scores)
    return sum(s for s, _ in scores) / max(tokens, 1)
