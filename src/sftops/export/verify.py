"""An exported GGUF read back as a deployer's runtime reads it (transformers' GGUF reader: the same metadata and
tensors llama.cpp loads), and compared with the evaluated model on the same rows: greedy answers one prompt at a
time, response NLL per row, stops (evaluate/parity.py's comparison)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sftops.chat import generation_prompt
from sftops.data.examples import encode_curated_rows
from sftops.evaluate.generation import Decoding, complete
from sftops.evaluate.parity import Answer, compare
from sftops.train.loss import score_rows


def answers(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int, max_length: int) -> list:
    """Greedy answers (one prompt at a time) and response NLL per token of `rows`, with this model's tokenizer."""
    prompts = [generation_prompt(tokenizer, r["messages"]) for r in rows]
    done = complete(model, tokenizer, prompts, Decoding(max_new_tokens=max_new_tokens), 1, "generate for export")
    examples, kept, _ = encode_curated_rows(tokenizer, rows, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    nll = [float("nan")] * len(rows)
    for i, (total, count) in zip(kept, score_rows(model, examples, 1, pad, torch.device("cpu"), desc="score")):
        nll[i] = total / max(count, 1)
    return [Answer(c.text, c.stopped, value) for c, value in zip(done, nll)]


def read_back(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.eval()
    return model, tokenizer


def verify_gguf(
    path: Path,
    evaluated: list[Answer],
    rows: list[dict[str, Any]],
    max_new_tokens: int,
    max_length: int,
    tolerance: float,
) -> dict[str, Any]:
    """The parity block of a GGUF file against the evaluated model's answers on `rows`, with the mean NLL cost."""
    model, tokenizer = read_back(path)
    exported = answers(model, tokenizer, rows, max_new_tokens, max_length)
    block = compare([str(r.get("id", i)) for i, r in enumerate(rows)], evaluated, exported, tolerance, str(path.name))
    block["mean_nll_cost"] = sum(e.nll - s.nll for s, e in zip(evaluated, exported)) / max(len(rows), 1)
    block["bytes"] = path.stat().st_size
    return block
