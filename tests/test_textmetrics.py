import pytest

from sftops.evaluate.scoring import best, generation_sample
from sftops.evaluate.textmetrics import exact_match, normalize, rouge_l


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
        (
            "Check if it's plugged in and hold the power button.",
            "Hold the power button for 10 seconds; check it's plugged in.",
        ),
    ]
    for prediction, reference in pairs:
        assert rouge_l(prediction, reference) == pytest.approx(scorer.score(reference, prediction)["rougeL"].fmeasure)


def test_answer_extraction_rules():
    from sftops.evaluate.textmetrics import extract_answer, extracted_match

    gsm = "Natalia sold 48/2 = 24 clips in May.\n#### 1,072"
    assert extract_answer(gsm, "gsm8k") == "1072"
    assert extract_answer("so the answer is 72", "gsm8k") is None  # strict: the '####' line is required
    assert extract_answer("so the answer is $72.00.", "last_number") == "72"
    assert extracted_match("working... #### 72.0", "reasoning #### 72", "gsm8k") == 1.0
    assert extracted_match("#### 71", "#### 72", "gsm8k") == 0.0
    assert extracted_match("I think 72", "#### 72", "gsm8k") == 0.0
    assert extracted_match("It is 72 apples", "#### 72", "last_number") == 1.0
    assert extracted_match("Hello, World!", "hello world", "normalized") == 1.0


def test_chrf_hand_computed_and_as_sacrebleu():
    from sacrebleu.metrics import CHRF

    from sftops.evaluate.textmetrics import chrf

    # 'abcdefg' vs 'abcdefh': n-gram precision = recall = 6/7, 5/6, 4/5, 3/4, 2/3, 1/2 for n = 1..6.
    assert chrf("abcdefg", "abcdefh") == pytest.approx(100 * (6 / 7 + 5 / 6 + 4 / 5 + 3 / 4 + 2 / 3 + 1 / 2) / 6)
    # 'abc' vs 'abcd': precision 1 for n = 1..3, recall 3/4, 2/3, 1/2 (n >= 4: no hypothesis n-grams, left out);
    # F-beta (beta 2) of the averages: 5 * P * R / (4 * P + R) with P = 1, R = 23/36 -> 115/167.
    assert chrf("abc", "abcd") == pytest.approx(100 * 115 / 167)
    pairs = [("The cat sat on the mat.", "the cat is on the mat"), ("#### 72", "She sold 72 clips. #### 72")]
    for hyp, ref in pairs:
        assert chrf(hyp, ref) == pytest.approx(CHRF().sentence_score(hyp, [ref]).score)


def test_length_stats_hand_computed():
    from sftops.evaluate.textmetrics import length_stats

    stats = length_stats(["a b", "a b c d", "a", "a b c"], "response")
    assert stats == {"response_words_mean": 2.5, "response_words_median": 2.5, "response_words_max": 4.0}
