import pytest

from sftops.evaluation import best, generation_sample
from sftops.textmetrics import exact_match, normalize, rouge_l


def test_normalize_and_exact_match():
    assert normalize("  Hello,   World! ") == "hello world"
    assert exact_match("Hello world.", "hello, world") == 1.0
    assert exact_match("hello", "hello world") == 0.0


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 words;
    # P = 5/6, R = 5/6, F1 = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS = 2 ("a c"); P = 2/3, R = 2/2 -> F1 = 0.8
    assert rouge_l("a b c", "a c") == pytest.approx(0.8)
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0


def test_generation_sample_has_distinct_prompts_with_all_their_references():
    conv = lambda q, a, i: {"id": i, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}  # noqa: E731
    rows = [conv("q1", "a", "3"), conv("q2", "b", "1"), conv("q1", "c", "2")]
    sample, refs = generation_sample(rows, 5)
    assert [r["messages"][0]["content"] for r in sample] == ["q2", "q1"]
    assert refs == [["b"], ["c", "a"]]
    assert best(rouge_l, "a", refs[1]) == 1.0


def test_rouge_l_agrees_with_the_rouge_score_package():
    """An independent implementation (Google's rouge-score, the reference for ROUGE-1.5.5)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [
        ("The cat sat on the mat.", "the cat is on the mat"),
        ("I am a bot, built with Python 3.", "I was written in Python"),
        ("no overlap here", "completely different words"),
        ("Check if it's plugged in and hold the power button.", "Hold the power button for 10 seconds; check it's plugged in."),
    ]
    for prediction, reference in pairs:
        assert rouge_l(prediction, reference) == pytest.approx(scorer.score(reference, prediction)["rougeL"].fmeasure)
