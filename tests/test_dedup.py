"""Near-duplicate detection: MinHash/LSH finds what the exact Jaccard similarity says it should, at scale,
and keeps the first copy."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest

from sftops.data.dedup import jaccard, minhash_signatures, near_duplicates, near_duplicates_of, normalise
from sftops.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
# The reference: the per-row loop with per-band dicts that near_duplicates_of replaced, the peer the benchmark times.
from bench_dedup_at_scale import peer_near_duplicates  # noqa: E402


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
    for _ in range(20):
        src, dst = rng.sample(range(10_000), 1)[0], 10_000 + rng.randrange(10_000)
        if dst in planted or src in planted:
            continue
        texts[dst] = texts[src] + " one more"
        planted[dst] = src
    found = near_duplicates(texts, 0.8)
    assert {i: k for i, (k, _) in found.items()} == planted


def signatures_with_planted_chains(rng: np.random.Generator, rows: int, num_perm: int, alphabet: int) -> np.ndarray:
    """Random signatures over a small alphabet (many shared bands, many tied similarities), then chains
    a ~ b ~ c: each planted row copies an earlier row (often itself planted) with a few values changed."""
    sig = rng.integers(0, alphabet, size=(rows, num_perm), dtype=np.uint32)
    for row in rng.choice(np.arange(1, rows), size=rows // 3, replace=False):
        source = rng.integers(0, row)
        sig[row] = sig[source]
        changed = rng.choice(num_perm, size=rng.integers(0, num_perm // 4 + 1), replace=False)
        sig[row, changed] = rng.integers(0, alphabet, size=len(changed))
    return sig


def as_dict(result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[int, tuple[int, float]]:
    rows, kept, sims = result
    assert np.all(np.diff(rows) > 0)  # sorted by duplicate row, each once
    return {int(r): (int(k), float(s)) for r, k, s in zip(rows, kept, sims)}


@pytest.mark.parametrize(
    ("num_perm", "threshold", "alphabet"), [(64, 0.85, 2), (64, 0.8, 1000), (64, 0.6, 3), (16, 0.5, 2), (32, 0.95, 4)]
)
def test_vectorised_index_matches_the_per_row_loop(num_perm, threshold, alphabet):
    rng = np.random.default_rng(num_perm + alphabet)
    for rows in (1, 2, 50, 600):
        sig = signatures_with_planted_chains(rng, rows, num_perm, alphabet)
        expected = peer_near_duplicates(sig, threshold)
        assert as_dict(near_duplicates_of(sig, threshold)) == expected
        assert as_dict(near_duplicates_of(sig.astype(np.uint64), threshold)) == expected


def test_a_chain_keeps_the_row_whose_nearest_earlier_copy_was_removed():
    """c is nearest to b, but b is a near-duplicate of a: c is compared only with kept rows (a, and d if kept)."""
    a = np.arange(64, dtype=np.uint32)
    b = a.copy()
    b[:6] += 1000  # b ~ a at 58/64
    c = b.copy()
    c[6:12] += 2000  # c ~ b at 58/64, c ~ a at 52/64
    sig = np.stack([a, b, c])
    assert as_dict(near_duplicates_of(sig, 0.8)) == peer_near_duplicates(sig, 0.8) == {1: (0, 58 / 64), 2: (0, 52 / 64)}
    assert as_dict(near_duplicates_of(sig, 0.85)) == peer_near_duplicates(sig, 0.85) == {1: (0, 58 / 64)}


def test_a_large_group_sharing_a_band_is_resolved_in_passes_or_refused():
    rng = np.random.default_rng(5)
    sig = rng.integers(0, 2**32, size=(3000, 64), dtype=np.uint32)
    sig[:, :8] = 7  # every row shares the first band: 4.5 million candidate pairs, none near
    sig[2000:] = sig[1000:2000]  # but these copies are
    assert as_dict(near_duplicates_of(sig, 0.85)) == {r: (r - 1000, 1.0) for r in range(2000, 3000)}
    with pytest.raises(DataError, match="data.near_duplicate_threshold") as refused:
        near_duplicates_of(sig, 0.85, max_candidate_pairs=1_000_000)
    # 3000 * 2999 / 2 pairs in the shared band, plus the 1000 copies again in each of the other 7 bands
    assert "\n" not in str(refused.value) and "4,505,500 candidate pairs" in str(refused.value)
    with pytest.raises(DataError, match="data.near_duplicate_threshold"):
        near_duplicates_of(sig, 0.85, max_near_pairs=999)


def test_a_chunks_signatures_do_not_depend_on_the_other_rows():
    rng = random.Random(3)
    words = [f"w{i}" for i in range(200)]
    texts = [" ".join(rng.choices(words, k=rng.randrange(0, 30))) for _ in range(500)]
    whole = minhash_signatures(texts, seed=4)
    chunks = np.concatenate([minhash_signatures(texts[lo : lo + 77], seed=4) for lo in range(0, 500, 77)])
    assert whole.dtype == np.uint32 and np.array_equal(whole, chunks)


def test_texts_longer_than_one_signature_step_are_estimated_like_short_ones():
    """A text of more shingles than one vectorised step holds gets a block of its own: its signature agreement with
    a variant still estimates the exact Jaccard similarity, and it does not disturb its neighbours' signatures."""
    rng = random.Random(6)
    words = [f"w{i}" for i in range(20_000)]
    long_text = [rng.choice(words) for _ in range(6000)]
    variant = [w if rng.random() > 0.1 else rng.choice(words) for w in long_text]
    short = [" ".join(rng.choices(words, k=40)) for _ in range(3)]
    texts = [short[0], " ".join(long_text), short[1], " ".join(variant), short[2]]
    sig = minhash_signatures(texts, num_perm=128)
    estimate = float(np.mean(sig[1] == sig[3]))
    assert abs(estimate - jaccard(texts[1], texts[3])) < 0.15
    assert np.array_equal(sig[[0, 2, 4]], minhash_signatures(short, num_perm=128))


def test_normalisation_turn_by_turn_and_the_ascii_path_give_the_words_of_the_whole():
    """The format stage normalises each turn once (its ASCII text by byte translation) and joins: the result must
    be the \\w+ words of the NFKC, case-folded whole conversation, as written out here with the regex."""
    import json as json_
    import re
    import unicodedata

    from sftops.data.chunks import conversation_and_prompt, conversation_text
    from sftops.data.split import prompt_text

    def words(text):
        return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()))

    rng = random.Random(7)
    pieces = ["Hello,", "WORLD!", "a_b", "x-y", "\t", "\n\n", "  ", "Straße", "ﬁne", "e\u0301", "\u0301", "東京"]
    pieces += ["x²", "", "ΣΑΣ"] + [chr(i) for i in range(128)]
    for _ in range(300):
        turns = [
            {"role": role, "content": "".join(rng.choices(pieces, k=rng.randrange(0, 12)))}
            for role in rng.choice([["user", "assistant"], ["system", "user", "assistant", "user", "assistant"]])
        ]
        if rng.random() < 0.3:
            turns[-1]["tool_calls"] = [{"function": {"name": "Get_Weather", "arguments": '{"City": "Köln"}'}}]
        whole = words("\n".join(f"{m['role']} {m['content']} {json_.dumps(m.get('tool_calls') or '')}" for m in turns))
        prompt = words("\n".join(f"{m['role']}: {m['content']}" for m in turns[:-1]))
        assert conversation_and_prompt(turns) == (whole, prompt) == (conversation_text(turns), prompt_text(turns))
        assert normalise(turns[-1]["content"]) == words(turns[-1]["content"])
