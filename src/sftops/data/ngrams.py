"""Word n-grams hashed to uint64, vectorised: the shingles of near-duplicate detection and the n-grams of the
contamination check. Words are split on whitespace (the texts are normalised first) and hashed once per distinct
word with blake2b (stable across processes, unlike hash())."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a salted copy of it per permutation is a good independent hash family
    (uint64 multiplication wraps modulo 2^64, as intended)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _word_hashes(words: list[str]) -> np.ndarray:
    """A stable uint64 per word (blake2b, not hash(): the same in every process), each distinct word hashed once."""
    codes = {w: i for i, w in enumerate(dict.fromkeys(words))}
    positions = np.fromiter(map(codes.__getitem__, words), dtype=np.int64, count=len(words))
    digests = b"".join(hashlib.blake2b(w.encode(), digest_size=8).digest() for w in codes)
    return np.frombuffer(digests, dtype="<u8")[positions]


def _distinct_per_prompt(owners: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (prompt, n-gram) pairs once each: a prompt's n-grams are a set, a repeated one counts once."""
    order = np.lexsort((hashes, owners))
    owners, hashes = owners[order], hashes[order]
    first = np.ones(len(owners), dtype=bool)
    first[1:] = (owners[1:] != owners[:-1]) | (hashes[1:] != hashes[:-1])
    return owners[first], hashes[first]


def _ngram_positions(lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt, position of the first word, words) of each n-gram, for prompts of these word counts: a prompt
    shorter than n words is one n-gram of all its words, a prompt without words has none."""
    counts = np.where(lengths >= n, lengths - n + 1, np.minimum(lengths, 1))
    owners = np.repeat(np.arange(len(lengths)), counts)
    within_prompt = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    first_word = np.repeat(np.cumsum(lengths) - lengths, counts) + within_prompt
    return owners, first_word, np.minimum(lengths, n)[owners]


def ngram_hashes(prompts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt index, uint64 hash) of each word n-gram of each prompt (words split on whitespace). The hash
    mixes the words in order and then the n-gram's length, so a short prompt's n-gram never equals a full one's."""
    split = [p.split() for p in prompts]
    words = _word_hashes(list(itertools.chain.from_iterable(split)))
    owners, first_word, size = _ngram_positions(np.array([len(w) for w in split], dtype=np.int64), n)
    hashes = np.full(len(owners), 0x9E3779B97F4A7C15, dtype=np.uint64)
    for k in range(n):
        if k < size.min(initial=n):
            hashes = mix64(hashes ^ words[first_word + k])
        else:  # past the last word of a short prompt's n-gram
            within = k < size
            hashes[within] = mix64(hashes[within] ^ words[first_word[within] + k])
    return owners, mix64(hashes ^ size.astype(np.uint64))
