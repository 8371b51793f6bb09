"""Near-duplicate detection: MinHash/LSH finds what the exact Jaccard similarity says it should, at scale,
and keeps the first copy."""

import random

from sftops.data.dedup import jaccard, near_duplicates, normalise


def test_normalisation_ignores_case_punctuation_and_spacing():
    assert normalise("Hello,   World!\n") == normalise("hello world") == "hello world"
    assert normalise("hello world") != normalise("hello there world")


def test_found_pairs_match_the_exact_jaccard_similarity():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    base = [" ".join(rng.choices(words, k=80)) for _ in range(300)]
    texts = list(base)
    for i in range(300):  # variants with a growing share of words replaced
        tokens = base[i].split()
        for j in rng.sample(range(80), k=i % 30):
            tokens[j] = rng.choice(words)
        texts.append(" ".join(tokens))
    threshold = 0.7
    found = near_duplicates(texts, threshold)
    for i in range(300, 600):
        true = jaccard(texts[i], texts[i - 300])
        if true >= threshold + 0.15:
            assert found.get(i, (None,))[0] == i - 300, (i, true)
        elif true <= threshold - 0.15:
            assert i not in found, (i, true, found[i])
    assert all(k < i for i, (k, _) in found.items())  # the kept copy is the earlier one
    assert not any(i < 300 for i in found)  # unrelated random texts are never paired


def test_planted_near_duplicates_are_found_among_twenty_thousand_rows():
    rng = random.Random(1)
    words = [f"w{i}" for i in range(5000)]
    texts = [" ".join(rng.choices(words, k=40)) for _ in range(20_000)]
    planted = {}
    for n in range(20):
        src, dst = rng.sample(range(10_000), 1)[0], 10_000 + rng.randrange(10_000)
        if dst in planted or src in planted:
            continue
        texts[dst] = texts[src] + " one more"
        planted[dst] = src
    found = near_duplicates(texts, 0.8)
    assert {i: k for i, (k, _) in found.items()} == planted
