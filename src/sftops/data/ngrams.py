"""Word n-grams hashed to uint64, vectorised: the shingles of near-duplicate detection and the n-grams of the
contamination check. Words are split on spaces (the texts are normalised first) and hashed once per distinct
word with blake2b (stable across processes, unlike hash())."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a salted copy of it per permutation is a good independent hash family
    (uint64 multiplication wraps modulo 2^64, as intended)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _words(texts: list[str] | pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(word count of each text, a stable uint64 hash of each word, text by text in order). Arrow splits the texts
    and finds the distinct words in C++ (a Python string and a dict lookup per word cost three times as much);
    each distinct word is hashed once with blake2b (not hash(): the same in every process). The words are what
    str.split() gives for texts whose only whitespace is spaces, as normalised texts are."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()  # one dictionary of distinct words, not one per chunk
    split = pc.split_pattern(texts if isinstance(texts, pa.Array) else pa.array(texts, pa.large_string()), " ")
    counts = pc.list_value_length(split).to_numpy(zero_copy_only=False).astype(np.int64)
    words = pc.list_flatten(split)
    empty = np.asarray(pc.equal(pc.utf8_length(words), 0))  # around and between repeated spaces
    distinct = pc.dictionary_encode(words)
    digests = b"".join(hashlib.blake2b(w.encode(), digest_size=8).digest() for w in distinct.dictionary.to_pylist())
    hashes = np.frombuffer(digests, dtype="<u8")[distinct.indices.to_numpy()]
    if empty.any():
        counts -= np.bincount(np.repeat(np.arange(len(texts)), counts)[empty], minlength=len(texts))
        hashes = hashes[~empty]
    return counts, hashes


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


def ngram_hashes(prompts: list[str] | pa.Array | pa.ChunkedArray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt index, uint64 hash) of each word n-gram of each prompt (words split on spaces). The hash
    mixes the words in order and then the n-gram's length, so a short prompt's n-gram never equals a full one's."""
    lengths, words = _words(prompts)
    owners, first_word, size = _ngram_positions(lengths, n)
    hashes = np.full(len(owners), 0x9E3779B97F4A7C15, dtype=np.uint64)
    for k in range(n):
        if k < size.min(initial=n):
            hashes = mix64(hashes ^ words[first_word + k])
        else:  # past the last word of a short prompt's n-gram
            within = k < size
            hashes[within] = mix64(hashes[within] ^ words[first_word[within] + k])
    return owners, mix64(hashes ^ size.astype(np.uint64))
