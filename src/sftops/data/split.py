"""The deterministic split and the contamination check. A row's split depends only on the seed and its own
normalised prompt, so adding rows never moves an existing one, and rows sharing a prompt share a split."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from sftops.data.dedup import normalise
from sftops.data.ngrams import _distinct_per_prompt, ngram_hashes

PROMPT_CHUNK = 20_000  # prompts hashed at once: their words and n-gram hashes, ~20 MB at 20 words


def message_words(message: dict[str, Any]) -> str:
    """A turn's role and content, normalised. Normalising turn by turn and joining gives the words of the
    normalised whole (NFKC never composes across the line break between turns)."""
    return normalise(f"{message['role']} {message['content']}")


def joined(parts: Iterable[str]) -> str:
    return " ".join(p for p in parts if p)


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """Everything before the final response, normalised (case, punctuation and spacing do not separate prompts)."""
    return joined(map(message_words, messages[:-1]))


def split_of(prompt: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


class ContaminationIndex:
    """The contamination check in memory bounded by the test side: the test prompts' distinct word n-grams,
    hashed to uint64 and sorted, and which of them the train prompts, added chunk by chunk, contain. Same
    results as comparing n-gram tuple sets, up to a 64-bit hash collision (about N^2 / 2^64 for N n-grams)."""

    def __init__(self, test_prompts: list[str], n: int, chunk: int = PROMPT_CHUNK):
        self.n = n
        self.test_count = len(test_prompts)
        owners, hashes = _distinct_per_prompt(*_chunked_ngram_hashes(test_prompts, n, chunk))
        self.grams, self._gram_of_pair = np.unique(hashes, return_inverse=True)
        self._owner_of_pair = owners
        self._seen = np.zeros(len(self.grams), dtype=bool)

    def add_train(self, prompts: list[str] | pa.Array | pa.ChunkedArray) -> None:
        """Marks the test n-grams these train prompts (strings, or an Arrow column of them) contain; chunks may
        come in any size and order."""
        _, hashes = ngram_hashes(prompts, self.n)
        at = np.searchsorted(self.grams, hashes)
        found = at < len(self.grams)
        found[found] = self.grams[at[found]] == hashes[found]
        self._seen[at[found]] = True

    def flagged(self, threshold: float) -> list[tuple[int, float]]:
        """(index of a test prompt, fraction of its distinct n-grams seen in train) at or above the threshold,
        by index; a prompt without words has no n-grams and is never flagged."""
        grams = np.bincount(self._owner_of_pair, minlength=self.test_count)
        seen = np.bincount(self._owner_of_pair, weights=self._seen[self._gram_of_pair], minlength=self.test_count)
        has_grams = grams > 0
        overlap = np.zeros(self.test_count)
        overlap[has_grams] = seen[has_grams] / grams[has_grams]  # float64 count / count, as len() / len()
        flagged = np.flatnonzero(has_grams & (overlap >= threshold))
        return [(int(i), float(overlap[i])) for i in flagged]


def _chunked_ngram_hashes(prompts: list[str], n: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """ngram_hashes() a chunk of prompts at a time, so only one chunk's words and n-grams are held at once."""
    owners, hashes = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.uint64)]
    for lo in range(0, len(prompts), chunk):
        chunk_owners, chunk_hashes = ngram_hashes(prompts[lo : lo + chunk], n)
        owners.append(chunk_owners + lo)
        hashes.append(chunk_hashes)
    return np.concatenate(owners), np.concatenate(hashes)


def contamination(
    train_prompts: list[str], test_prompts: list[str], n: int, threshold: float
) -> list[tuple[int, float]]:
    """(index of a test prompt, fraction of its word n-grams found among the train prompts' n-grams) for
    every test prompt at or above the threshold. Prompts shorter than n words count as one n-gram."""
    index = ContaminationIndex(test_prompts, n)
    for lo in range(0, len(train_prompts), PROMPT_CHUNK):
        index.add_train(train_prompts[lo : lo + PROMPT_CHUNK])
    return index.flagged(threshold)
