"""The deterministic split and the contamination check. A row's split depends only on the seed and its own
normalised prompt, so adding rows never moves an existing one, and rows sharing a prompt share a split."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from sftops.data.dedup import mix64, normalise

TRAIN_CHUNK = 100_000  # train prompts hashed at once: ~2 million n-grams, ~50 MB of intermediates


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


class ContaminationIndex:
    """The contamination check in memory bounded by the test side: the test prompts' distinct word n-grams,
    hashed to uint64 and sorted, and which of them the train prompts, added chunk by chunk, contain. Same
    results as comparing n-gram tuple sets, up to a 64-bit hash collision (about N^2 / 2^64 for N n-grams)."""

    def __init__(self, test_prompts: list[str], n: int):
        self.n = n
        self.test_prompts = len(test_prompts)
        owners, hashes = ngram_hashes(test_prompts, n)
        pairs = np.unique(np.stack([owners.astype(np.uint64), hashes]), axis=1)  # a set per prompt, as ngrams()
        self.grams, self._gram_of_pair = np.unique(pairs[1], return_inverse=True)
        self._owner_of_pair = pairs[0].astype(np.int64)
        self._seen = np.zeros(len(self.grams), dtype=bool)

    def add_train(self, prompts: list[str]) -> None:
        """Marks the test n-grams these train prompts contain; chunks may come in any size and order."""
        _, hashes = ngram_hashes(prompts, self.n)
        at = np.searchsorted(self.grams, hashes)
        found = at < len(self.grams)
        found[found] = self.grams[at[found]] == hashes[found]
        self._seen[at[found]] = True

    def flagged(self, threshold: float) -> list[tuple[int, float]]:
        """(index of a test prompt, fraction of its distinct n-grams seen in train) at or above the threshold,
        by index; a prompt without words has no n-grams and is never flagged."""
        grams = np.bincount(self._owner_of_pair, minlength=self.test_prompts)
        seen = np.bincount(self._owner_of_pair, weights=self._seen[self._gram_of_pair], minlength=self.test_prompts)
        has_grams = grams > 0
        overlap = np.zeros(self.test_prompts)
        overlap[has_grams] = seen[has_grams] / grams[has_grams]  # float64 count / count, as len() / len()
        flagged = np.flatnonzero(has_grams & (overlap >= threshold))
        return [(int(i), float(overlap[i])) for i in flagged]


def _word_hashes(words: list[str]) -> np.ndarray:
    """A stable uint64 per word (blake2b, not hash(): the same in every process), each distinct word hashed once."""
    codes: dict[str, int] = {}
    positions = np.fromiter((codes.setdefault(w, len(codes)) for w in words), dtype=np.int64, count=len(words))
    digests = b"".join(hashlib.blake2b(w.encode(), digest_size=8).digest() for w in codes)
    return np.frombuffer(digests, dtype="<u8")[positions]


def ngram_hashes(prompts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt index, uint64 hash) of each word n-gram of each prompt, as ngrams() cuts them: a prompt shorter
    than n words is one n-gram of all its words, a prompt without words has none. The hash mixes the words
    in order and then the n-gram's length, so a short prompt's n-gram never equals a full one's."""
    split = [p.split() for p in prompts]
    lengths = np.array([len(w) for w in split], dtype=np.int64)
    words = _word_hashes([w for ws in split for w in ws])
    starts = np.cumsum(lengths) - lengths
    grams = np.where(lengths >= n, lengths - n + 1, np.minimum(lengths, 1))
    owners = np.repeat(np.arange(len(prompts)), grams)
    first_word = np.repeat(starts, grams) + (np.arange(int(grams.sum())) - np.repeat(np.cumsum(grams) - grams, grams))
    size = np.minimum(lengths, n)[owners]
    hashes = np.full(len(owners), 0x9E3779B97F4A7C15, dtype=np.uint64)
    for k in range(n):
        within = k < size  # a short prompt's n-gram stops at its last word
        hashes[within] = mix64(hashes[within] ^ words[first_word[within] + k])
    return owners, mix64(hashes ^ size.astype(np.uint64))


def contamination(train_prompts: list[str], test_prompts: list[str], n: int, threshold: float) -> list[tuple[int, float]]:
    """(index of a test prompt, fraction of its word n-grams found among the train prompts' n-grams) for
    every test prompt at or above the threshold. Prompts shorter than n words count as one n-gram."""
    index = ContaminationIndex(test_prompts, n)
    for lo in range(0, len(train_prompts), TRAIN_CHUNK):
        index.add_train(train_prompts[lo : lo + TRAIN_CHUNK])
    return index.flagged(threshold)
