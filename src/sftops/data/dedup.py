"""Exact and near-duplicate detection on normalised text. Near-duplicates: MinHash signatures of word 3-gram
sets (numpy, vectorised over all rows at once) with LSH banding to find candidate pairs, confirmed by the
signature agreement (an estimate of the Jaccard similarity). The first copy in input order is kept."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np

from sftops.data.ngrams import mix64, ngram_hashes
from sftops.errors import DataError

_WORD = re.compile(r"\w+")


# ASCII bytes: word characters (\w: letters, digits, underscore) lower-cased, the others -> space
_ASCII_WORDS = bytes(
    ord(chr(b).lower()) if b < 128 and (chr(b).isalnum() or b == ord("_")) else ord(" ") for b in range(256)
)


def normalise(text: str) -> str:
    """Case, accents' composition, punctuation and whitespace do not make two texts different: the \\w+ words of
    the NFKC, case-folded text, joined by single spaces. ASCII text (most of it) is its own NFKC form and
    case-folds to its lower case, so it takes one byte translation, a third of the regex's time, with the same
    words."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text).casefold()
        if not text.isascii():
            return " ".join(_WORD.findall(text))
    return " ".join(text.encode().translate(_ASCII_WORDS).decode().split())


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


SIGNATURE_CHUNK = 10_000  # texts whose words are Python strings at once
_EMPTY_TEXT = np.uint64(0x2545F4914F6CDD1D)  # the one shingle of a text without words


def minhash_signatures(
    texts: Sequence[str], num_perm: int = 64, seed: int = 0, n: int = 3, normalised: bool = False
) -> np.ndarray:
    """(rows, num_perm) uint32 MinHash signatures of each text's set of word n-grams (a text of n words or fewer
    is one shingle of all its words). A row's signature depends only on its own text, the seed and num_perm,
    so chunks computed apart (worker processes) concatenate into the signatures of the whole.

    Shingles are hashed to uint64 on word hashes (data/ngrams.py, no string per shingle); permutation p is
    h -> (a_p h + b_p) mod 2^64 with a random odd a_p, of which the minimum's high 32 bits are kept (taking the
    high bits after the minimum equals the minimum of the high bits). Two different shingles collide in a
    permutation with probability about 2^-32, far below the 1/num_perm resolution of the estimate.
    normalised: the texts already went through normalise() (the format stage's conversation texts)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
    b = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True)
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    for lo in range(0, len(texts), SIGNATURE_CHUNK):
        block = texts[lo : lo + SIGNATURE_CHUNK]
        out[lo : lo + SIGNATURE_CHUNK] = _signature_block(
            block if normalised else [normalise(t) for t in block], a, b, n
        )
    return out


def _signature_block(texts: Sequence[str], a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    owners, hashes = ngram_hashes(list(texts), n)
    empty = np.flatnonzero(np.bincount(owners, minlength=len(texts)) == 0)
    if len(empty):  # shingles() gives a text without words one empty shingle; so does this
        order = np.argsort(np.concatenate([owners, empty]), kind="stable")
        owners = np.concatenate([owners, empty])[order]
        hashes = np.concatenate([hashes, np.full(len(empty), _EMPTY_TEXT, dtype=np.uint64)])[order]
    counts = np.bincount(owners, minlength=len(texts))
    starts = np.cumsum(counts) - counts
    out = np.empty((len(texts), len(a)), dtype=np.uint32)
    # Shingles per step: a (perms, shingles) uint64 block of 2 MB, in one buffer reused step after step (a fresh
    # 32 MB block each step spent more time in page faults than in the arithmetic, and varied run to run)
    budget = max(1, 262_144 // len(a))
    buffer = np.empty(len(a) * budget, dtype=np.uint64)
    ends = np.cumsum(counts)
    row = 0
    while row < len(texts):
        end = max(int(np.searchsorted(ends, starts[row] + budget, side="right")), row + 1)
        lo, hi = starts[row], ends[end - 1]
        # (perms, shingles): each row's run is contiguous; a row longer than the budget gets a block of its own
        block = buffer[: len(a) * (hi - lo)].reshape(len(a), hi - lo) if hi - lo <= budget else None
        permuted = np.multiply(a[:, None], hashes[None, lo:hi], out=block)
        permuted += b[:, None]
        mins = np.minimum.reduceat(permuted, starts[row:end] - lo, axis=1)
        mins >>= np.uint64(32)
        out[row:end] = mins.T
        row = end
    return out


# Bounds on the near-duplicate index, so that templated data (thousands of rows sharing a band) stops with a
# clear error instead of an out-of-memory kill or a quadratic run that never ends.
MAX_CANDIDATE_PAIRS = 500_000_000  # pairs sharing a band, compared in blocks: time (~130 CPU ns each), not memory
MAX_NEAR_PAIRS = 10_000_000  # pairs at or above the threshold, held for the resolution: ~10 bytes each
_PAIR_BLOCK = 1 << 16  # candidate pairs compared at once: two (block, num_perm) gathers of ~16 MB each
_RESOLVE_BLOCK = 1 << 20  # near pairs resolved at once as Python ints: ~120 MB of them, not 1.2 GB at the bound


def _band_keys(band: np.ndarray) -> np.ndarray:
    """One uint64 per row for the row's values in this band: equal values give equal keys; a rare unequal pair
    with equal keys is caught later, where the pair's values are compared."""
    keys = np.full(len(band), 0x9E3779B97F4A7C15, dtype=np.uint64)
    for values in band.T:
        keys = mix64(keys ^ values.astype(np.uint64))
    return keys


def _shared_groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows sharing their key with another row, ordered by key then row index; the end position of each one's
    group in that order; the group sizes). The stable sort keeps each group in row order, so within a group
    an earlier position is an earlier row."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
    all_sizes = np.diff(np.append(starts, len(keys)))
    shared = all_sizes >= 2
    order = order[np.repeat(shared, all_sizes)]
    sizes = all_sizes[shared]
    ends = np.repeat(np.cumsum(sizes), sizes)
    return order, ends, sizes


def _group_pairs(order: np.ndarray, ends: np.ndarray):
    """(earlier rows, later rows) of every pair of rows within a group, in blocks of at most _PAIR_BLOCK pairs:
    the d-th pass pairs each position with the one d places on, so a pass never holds more than one pair
    per row and a large group costs passes, not memory."""
    active = np.arange(len(order))
    step = 1
    while True:
        active = active[active + step < ends[active]]
        if not len(active):
            return
        for lo in range(0, len(active), _PAIR_BLOCK):
            block = active[lo : lo + _PAIR_BLOCK]
            yield order[block], order[block + step]
        step += 1


def _refuse_large_index(what: str, count: int, bound: int, largest_group: int) -> None:
    raise DataError(
        f"near-duplicate index: {count:,} {what} exceed the bound of {bound:,} (the largest group of rows "
        f"sharing an LSH band has {largest_group:,} rows, typically templated prompts); raise "
        "data.near_duplicate_threshold (longer bands, fewer candidates), or set it to null to skip near-duplicate "
        "removal, or remove the templated rows"
    )


def _near_pairs(
    signatures: np.ndarray, threshold: float, max_candidate_pairs: int, max_near_pairs: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(later row, earlier row, agreeing permutations) of every pair sharing at least one band whose signature
    agreement is at or above the threshold, each pair once (in the first band it shares)."""
    num_perm = signatures.shape[1]
    bands, rows = _lsh_shape(num_perm, threshold)
    groups = [_shared_groups(_band_keys(signatures[:, k * rows : (k + 1) * rows])) for k in range(bands)]
    candidates = sum(int((sizes * (sizes - 1) // 2).sum()) for _, _, sizes in groups)
    largest = max((int(sizes.max()) for _, _, sizes in groups if len(sizes)), default=0)
    if candidates > max_candidate_pairs:
        _refuse_large_index("candidate pairs", candidates, max_candidate_pairs, largest)
    index_dtype = np.int32 if len(signatures) < 2**31 else np.int64
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    held = 0
    for k, (order, ends, _) in enumerate(groups):
        for earlier, later in _group_pairs(order, ends):
            agree = signatures[earlier] == signatures[later]
            in_band = agree[:, k * rows : (k + 1) * rows].all(axis=1)  # equal keys, unequal values: no match
            seen_before = agree[:, : k * rows].reshape(len(agree), k, rows).all(axis=2).any(axis=1)
            agreeing = agree.sum(axis=1)
            # count / num_perm in float64 is exactly float(np.mean(agree)) as the per-row loop compared it
            near = in_band & ~seen_before & (agreeing / num_perm >= threshold)
            if near.any():
                found.append(
                    (
                        later[near].astype(index_dtype),
                        earlier[near].astype(index_dtype),
                        agreeing[near].astype(np.uint16),
                    )
                )
                held += int(near.sum())
                if held > max_near_pairs:
                    _refuse_large_index(f"pairs at or above the threshold {threshold}", held, max_near_pairs, largest)
    if not found:
        empty = np.empty(0, dtype=index_dtype)
        return empty, empty, np.empty(0, dtype=np.uint16)
    return tuple(np.concatenate(parts) for parts in zip(*found))  # type: ignore[return-value]


def _resolve_in_order(later: np.ndarray, earlier: np.ndarray, agreeing: np.ndarray, rows: int) -> np.ndarray:
    """Positions of the chosen pairs, visiting rows in order: a row takes its most similar candidate (ties to
    the smallest index) among earlier rows that were kept, so its own choice depends only on earlier rows'."""
    best_first = np.lexsort((earlier, -agreeing.astype(np.int32), later))
    is_duplicate = bytearray(rows)
    chosen = []
    decided = -1
    for lo in range(0, len(best_first), _RESOLVE_BLOCK):
        block = best_first[lo : lo + _RESOLVE_BLOCK]
        for position, row, candidate in zip(block.tolist(), later[block].tolist(), earlier[block].tolist()):
            if row != decided and not is_duplicate[candidate]:
                is_duplicate[row] = 1
                decided = row
                chosen.append(position)
    return np.array(chosen, dtype=np.int64)


def near_duplicates_of(
    signatures: np.ndarray,
    threshold: float,
    max_candidate_pairs: int = MAX_CANDIDATE_PAIRS,
    max_near_pairs: int = MAX_NEAR_PAIRS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(near-duplicate rows, the earlier kept row each duplicates, estimated similarity), sorted by row. Rows are
    visited in order; a row's candidates are the earlier kept rows sharing an LSH band with it; the most
    similar candidate at or above the threshold wins (ties to the smallest index); a near-duplicate row is
    never a candidate for later rows. Vectorised: all pairs at or above the threshold first, in bounded
    blocks, then the in-order resolution over those few pairs only."""
    if not len(signatures):
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.float64)
    later, earlier, agreeing = _near_pairs(signatures, threshold, max_candidate_pairs, max_near_pairs)
    chosen = _resolve_in_order(later, earlier, agreeing, len(signatures))
    sims = agreeing[chosen].astype(np.float64) / signatures.shape[1]
    return later[chosen].astype(np.int64), earlier[chosen].astype(np.int64), sims


def near_duplicates(
    texts: Sequence[str], threshold: float, num_perm: int = 64, seed: int = 0
) -> dict[int, tuple[int, float]]:
    """{index of a near-duplicate: (index of the earlier kept copy, estimated similarity)}."""
    rows, kept, sims = near_duplicates_of(minhash_signatures(texts, num_perm, seed), threshold)
    return {int(r): (int(k), float(s)) for r, k, s in zip(rows.tolist(), kept.tolist(), sims.tolist())}
