"""The deterministic split and the contamination check. A row's split depends only on the seed and its own
normalised prompt, so adding rows never moves an existing one, and rows sharing a prompt share a split."""

from __future__ import annotations

import hashlib
from typing import Any

from sftops.data.dedup import normalise


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """Everything before the final response, normalised (case, punctuation and spacing do not separate prompts)."""
    return normalise("\n".join(f"{m['role']}: {m['content']}" for m in messages[:-1]))


def split_of(prompt: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = text.split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def contamination(train_prompts: list[str], test_prompts: list[str], n: int, threshold: float) -> list[tuple[int, float]]:
    """(index of a test prompt, fraction of its word n-grams found among the train prompts' n-grams) for
    every test prompt at or above the threshold. Prompts shorter than n words count as one n-gram."""
    seen: set[tuple[str, ...]] = set()
    for p in train_prompts:
        seen |= ngrams(p, n)
    flagged = []
    for i, p in enumerate(test_prompts):
        grams = ngrams(p, n)
        if grams:
            overlap = len(grams & seen) / len(grams)
            if overlap >= threshold:
                flagged.append((i, overlap))
    return flagged


class ContaminationIndex:
    """contamination() with the train side streamed: built from the test prompts, fed train prompts chunk by chunk."""

    def __init__(self, test_prompts: list[str], n: int) -> None:
        self.n, self.grams = n, [ngrams(p, n) for p in test_prompts]
        self.seen: set[tuple[str, ...]] = set()
        self.wanted = set().union(*self.grams) if self.grams else set()

    def add_train(self, prompts: list[str]) -> None:
        for p in prompts:
            self.seen |= ngrams(p, self.n) & self.wanted

    def flagged(self, threshold: float) -> list[tuple[int, float]]:
        out = []
        for i, grams in enumerate(self.grams):
            if grams:
                overlap = len(grams & self.seen) / len(grams)
                if overlap >= threshold:
                    out.append((i, overlap))
        return out
