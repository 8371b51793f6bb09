"""Exact and near-duplicate detection on normalised text. Near-duplicates: MinHash signatures of word 3-gram
sets (numpy, vectorised over all rows at once) with LSH banding to find candidate pairs, confirmed by the
signature agreement (an estimate of the Jaccard similarity). The first copy in input order is kept."""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"\w+")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a salted copy of it per permutation is a good independent hash family
    (uint64 multiplication wraps modulo 2^64, as intended)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def normalise(text: str) -> str:
    """Case, accents' composition, punctuation and whitespace do not make two texts different."""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


def shingles(text: str, n: int = 3) -> list[str]:
    words = normalise(text).split()
    if len(words) <= n:
        return [" ".join(words)]
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def jaccard(a: str, b: str, n: int = 3) -> float:
    """Exact Jaccard similarity of the two texts' shingle sets (the quantity MinHash estimates)."""
    sa, sb = set(shingles(a, n)), set(shingles(b, n))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def _lsh_shape(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows per band) whose S-curve midpoint (1/b)^(1/r) is closest below the threshold, so that
    pairs at the threshold are very likely candidates (they are then confirmed on the signature)."""
    best = (num_perm, 1)
    best_gap = float("inf")
    for r in range(1, num_perm + 1):
        if num_perm % r:
            continue
        b = num_perm // r
        mid = (1 / b) ** (1 / r)
        gap = threshold - mid
        if 0 <= gap < best_gap:
            best, best_gap = (b, r), gap
    return best


def minhash_signatures(texts: Sequence[str], num_perm: int = 64, seed: int = 0, n: int = 3) -> np.ndarray:
    """(rows, num_perm) uint64 MinHash signatures of each text's shingle set."""
    per_row = [sorted({zlib.crc32(s.encode()) for s in shingles(t, n)}) for t in texts]
    counts = np.array([len(h) for h in per_row], dtype=np.int64)
    hashes = np.fromiter((h for row in per_row for h in row), dtype=np.uint64, count=int(counts.sum()))
    rng = np.random.default_rng(seed)
    salts = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.empty((len(texts), num_perm), dtype=np.uint64)
    chunk = max(1, 2_000_000 // num_perm)  # bound the (shingles, perms) intermediate to ~16 MB
    row = 0
    while row < len(texts):
        end = int(np.searchsorted(np.cumsum(counts[row:]), chunk, side="right")) + row
        end = max(end, row + 1)
        lo, hi = starts[row], starts[end - 1] + counts[end - 1]
        perm = _mix64(hashes[lo:hi, None] ^ salts)
        out[row:end] = np.minimum.reduceat(perm, starts[row:end] - lo, axis=0)
        row = end
    return out


def near_duplicates_of(sig: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices of near-duplicate rows, the earlier kept copy of each, estimated similarity), by duplicate index.
    Rows are visited in order; a row's candidates are the earlier kept rows sharing an LSH band with it."""
    n, num_perm = sig.shape if sig.ndim == 2 else (0, 1)
    bands, rows = _lsh_shape(num_perm, threshold)
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    found: list[tuple[int, int, float]] = []
    for i in range(n):
        keys = [sig[i, k * rows : (k + 1) * rows].tobytes() for k in range(bands)]
        candidates = {j for k, key in enumerate(keys) for j in buckets[k].get(key, ())}
        best = None
        for j in sorted(candidates):
            sim = float(np.mean(sig[i] == sig[j]))
            if sim >= threshold and (best is None or sim > best[1]):
                best = (j, sim)
        if best is not None:
            found.append((i, *best))
            continue
        for k, key in enumerate(keys):
            buckets[k].setdefault(key, []).append(i)
    dups = np.array([f[0] for f in found], dtype=np.int64)
    return dups, np.array([f[1] for f in found], dtype=np.int64), np.array([f[2] for f in found], dtype=np.float64)


def near_duplicates(
    texts: Sequence[str], threshold: float, num_perm: int = 64, seed: int = 0
) -> dict[int, tuple[int, float]]:
    """{index of a near-duplicate: (index of the earlier kept copy, estimated similarity)}."""
    if not texts:
        return {}
    dups, kept, sims = near_duplicates_of(minhash_signatures(texts, num_perm, seed), threshold)
    return {int(i): (int(k), float(s)) for i, k, s in zip(dups, kept, sims)}
