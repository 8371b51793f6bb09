"""Time and peak memory of the format stage's two whole-dataset checks at a million rows, each against the
per-row Python form it replaced (the peer, run on the first --peer-rows rows, where it still fits):

- near-duplicates: `minhash_signatures` (one process here; the stage splits it over workers) and the LSH index
  `near_duplicates_of`, against the per-row loop with per-band dicts of bytes keys;
- contamination: `ContaminationIndex` (test side indexed, train added in chunks), against one Python set of
  every train n-gram tuple.

    python bench/bench_dedup_at_scale.py                       # 1,000,000 rows, 3% planted near-duplicates
    python bench/bench_dedup_at_scale.py --rows 200000 --peer-rows 50000

Synthetic rows: 30 words drawn from 50,000; a planted near-duplicate copies an earlier row (often itself a
copy, so chains occur) and appends a word. Contamination: 20-word prompts, 10% of them the test side, a third
of the test prompts copied from train with two words changed. Prints seconds, peak RSS above the start, the
number found, and new / peer on the peer's rows (equal results are checked, not assumed)."""

from __future__ import annotations

import argparse
import os
import random
import threading
import time

import numpy as np
import psutil

from sftops.data.dedup import _lsh_shape, minhash_signatures, near_duplicates_of
from sftops.data.split import ContaminationIndex


def measured(work):
    """(result, "wall s (CPU s)", peak RSS above the RSS at the start in GiB), RSS sampled every 2 ms. The CPU
    seconds count this process only (the sampler thread is asleep nearly always): on a shared machine they
    are the figure to compare."""
    me, peak, running = psutil.Process(), [0], [True]
    before = me.memory_info().rss

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        result = work()
    finally:
        seconds = f"{time.perf_counter() - start:.2f} s ({time.process_time() - cpu_start:.2f} CPU s)"
        running[0] = False
        sampler.join()
    return result, seconds, (max(peak[0], me.memory_info().rss) - before) / 2**30


def synthetic_texts(rows: int, duplicate_share: float, rng: random.Random) -> list[str]:
    words = [f"w{i}" for i in range(50_000)]
    texts = [" ".join(rng.choices(words, k=30)) for _ in range(rows)]
    for row in rng.sample(range(1, rows), k=int(rows * duplicate_share)):
        texts[row] = texts[rng.randrange(row)] + " " + rng.choice(words)
    return texts


def peer_near_duplicates(sig: np.ndarray, threshold: float) -> dict[int, tuple[int, float]]:
    """The per-row loop near_duplicates ran before near_duplicates_of."""
    bands, rows = _lsh_shape(sig.shape[1], threshold)
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    found: dict[int, tuple[int, float]] = {}
    for i in range(len(sig)):
        keys = [sig[i, k * rows : (k + 1) * rows].tobytes() for k in range(bands)]
        candidates = {j for k, key in enumerate(keys) for j in buckets[k].get(key, ())}
        best = None
        for j in sorted(candidates):
            sim = float(np.mean(sig[i] == sig[j]))
            if sim >= threshold and (best is None or sim > best[1]):
                best = (j, sim)
        if best is not None:
            found[i] = best
            continue
        for k, key in enumerate(keys):
            buckets[k].setdefault(key, []).append(i)
    return found


def peer_contamination(train: list[str], test: list[str], n: int, threshold: float) -> list[tuple[int, float]]:
    """The set-based check contamination() ran before ContaminationIndex."""

    def grams(text: str) -> set[tuple[str, ...]]:
        words = text.split()
        if len(words) < n:
            return {tuple(words)} if words else set()
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}

    seen: set[tuple[str, ...]] = set()
    for p in train:
        seen |= grams(p)
    flagged = []
    for i, p in enumerate(test):
        g = grams(p)
        if g and len(g & seen) / len(g) >= threshold:
            flagged.append((i, len(g & seen) / len(g)))
    return flagged


def as_dict(result) -> dict[int, tuple[int, float]]:
    return {int(r): (int(k), float(s)) for r, k, s in zip(*result)}


def bench_near_duplicates(args: argparse.Namespace) -> None:
    texts = synthetic_texts(args.rows, 0.03, random.Random(0))
    sig, sig_s, sig_gib = measured(lambda: minhash_signatures(texts))
    print(
        f"minhash_signatures: {args.rows:,} rows in {sig_s}, peak +{sig_gib:.2f} GiB "
        f"(signatures {sig.nbytes / 2**30:.2f} GiB, {sig.dtype})"
    )
    texts.clear()  # the stage holds signatures, not texts, while it builds the index
    found, index_s, index_gib = measured(lambda: near_duplicates_of(sig, args.threshold))
    print(
        f"near_duplicates_of: {args.rows:,} rows in {index_s}, peak +{index_gib:.2f} GiB above the "
        f"signatures, {len(found[0]):,} near-duplicates (planted {int(args.rows * 0.03):,}), threshold {args.threshold}"
    )
    head = sig[: args.peer_rows]
    new, new_s, new_gib = measured(lambda: as_dict(near_duplicates_of(head, args.threshold)))
    old, old_s, old_gib = measured(lambda: peer_near_duplicates(head, args.threshold))
    assert new == old, "near_duplicates_of disagrees with the per-row loop"
    print(
        f"  vs per-row loop on {len(head):,} rows: {new_s} / {old_s}; "
        f"peak +{new_gib:.2f} / +{old_gib:.2f} GiB; same {len(new):,} pairs"
    )


def bench_contamination(args: argparse.Namespace) -> None:
    rng = random.Random(1)
    words = [f"w{i}" for i in range(50_000)]
    prompts = [" ".join(rng.choices(words, k=20)) for _ in range(args.rows)]
    test_rows = set(rng.sample(range(args.rows), k=args.rows // 10))
    train = [p for i, p in enumerate(prompts) if i not in test_rows]
    test = [p for i, p in enumerate(prompts) if i in test_rows]
    prompts.clear()
    for i in range(0, len(test), 3):
        copied = train[rng.randrange(len(train))].split()
        copied[rng.randrange(20)], copied[rng.randrange(20)] = rng.choice(words), rng.choice(words)
        test[i] = " ".join(copied)

    def streamed(train_part: list[str]) -> list[tuple[int, float]]:
        index = ContaminationIndex(test, args.ngram)
        for lo in range(0, len(train_part), 100_000):
            index.add_train(train_part[lo : lo + 100_000])
        return index.flagged(0.5)

    flagged, new_s, new_gib = measured(lambda: streamed(train))
    print(
        f"ContaminationIndex: {len(train):,} train x {len(test):,} test prompts, {args.ngram}-grams, in "
        f"{new_s}, peak +{new_gib:.2f} GiB, {len(flagged):,} flagged at 0.5"
    )
    head = train[: args.peer_rows]
    new, new_s, new_gib = measured(lambda: streamed(head))
    old, old_s, old_gib = measured(lambda: peer_contamination(head, test, args.ngram, 0.5))
    assert new == old, "ContaminationIndex disagrees with the set-based check"
    print(
        f"  vs set-based on {len(head):,} train prompts: {new_s} / {old_s}; "
        f"peak +{new_gib:.2f} / +{old_gib:.2f} GiB; same {len(new):,} flagged"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--peer-rows", type=int, default=100_000)
    parser.add_argument("--threshold", type=float, default=0.85)
    parser.add_argument("--ngram", type=int, default=8)
    parser.add_argument("--only", choices=["near-duplicates", "contamination"])
    args = parser.parse_args()
    print(f"settings: {vars(args)}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.only != "contamination":
        bench_near_duplicates(args)
    if args.only != "near-duplicates":
        bench_contamination(args)


if __name__ == "__main__":
    main()
