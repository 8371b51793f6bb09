"""Batched greedy generation with the KV cache and left padding, stopping at EOS or end of turn."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from sftops.chat import generation_prompt, stop_token_ids


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[str]:
    """Completions of already-rendered prompts (see chat.generation_prompt)."""
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch", leave=False):
            enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(**enc, generation_config=config)
            new = out[:, enc["input_ids"].shape[1] :]
            outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return outputs


def answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], max_new_tokens: int = 64) -> list[str]:
    """Answers to plain user questions, each rendered as a one-turn conversation with the model's template."""
    prompts = [generation_prompt(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": ""}]) for q in questions]
    return generate(model, tokenizer, prompts, max_new_tokens)
