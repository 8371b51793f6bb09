"""Batched generation with the KV cache and left padding, stopping at EOS or end of turn; greedy by default,
sampling (temperature, top-p, seeded) when asked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from sftops.chat import generation_prompt, stop_token_ids
from sftops.config import EvaluateConfig


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def decoding_of(cfg: EvaluateConfig) -> Decoding:
    return Decoding(cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.sample_seed)


@dataclass(frozen=True)
class Completion:
    text: str
    new_tokens: int  # generated tokens, the stop token included
    stopped: bool  # ended on EOS/end of turn rather than at max_new_tokens


@torch.no_grad()
def complete(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    decoding: Decoding,
    batch_size: int = 8,
    desc: str = "generate",
) -> list[Completion]:
    """Completions of already-rendered prompts (see chat.generation_prompt), batch_size prompts at a time."""
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer)
    sampling = {"temperature": decoding.temperature, "top_p": decoding.top_p} if decoding.do_sample else {}
    config = GenerationConfig(
        max_new_tokens=decoding.max_new_tokens,
        do_sample=decoding.do_sample,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **sampling,
    )
    if decoding.do_sample:
        torch.manual_seed(decoding.seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs: list[Completion] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
            enc = tokenizer(
                list(prompts[start : start + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(**enc, generation_config=config)
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                ends = [i for i, t in enumerate(row) if t in stops]
                kept = row[: ends[0] + 1] if ends else row  # what follows the first stop is padding
                text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                outputs.append(Completion(text, len(kept), bool(ends)))
    finally:
        tokenizer.padding_side = side
    return outputs


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[str]:
    """Greedy completions of already-rendered prompts, as text."""
    return [c.text for c in complete(model, tokenizer, prompts, Decoding(max_new_tokens=max_new_tokens), batch_size)]


def answer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], max_new_tokens: int = 64
) -> list[str]:
    """Answers to plain user questions, each rendered as a one-turn conversation with the model's template."""
    prompts = [
        generation_prompt(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": ""}])
        for q in questions
    ]
    return generate(model, tokenizer, prompts, max_new_tokens)
