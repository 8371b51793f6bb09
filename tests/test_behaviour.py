"""What fine-tuning did to the answers, the parts that need no model: degenerate answers against hand-written
examples (loops, near-empty, unstopped, normal answers), the length ratio's paired bootstrap against a plain-Python
resampling, the shares and their changes against hand counts, and the gate: a collapsed model refused with the set,
the metric and the figures in one line, a sound one passed, an informational suite never blocking."""

from __future__ import annotations

import random

import pytest

from sftops.evaluate.behaviour import (
    compare_behaviour,
    degenerate_reason,
    repeated_ngram,
    within_tokens,
    words,
)
from sftops.evaluate.comparison import ratio_of_means_ci
from sftops.evaluate.generation import Completion
from sftops.evaluate.promotion import (
    CHALLENGER,
    CHAMPION,
    LENGTH_RATIO,
    LENGTH_RATIO_TO_REFERENCE,
    behaviour_checks,
    decide,
    with_budget,
)


@pytest.mark.parametrize(
    ("text", "stopped", "reference", "reason"),
    [
        ("Ashish, Ashish, Ashish, Ashish, Ashish", True, None, "loop"),
        ("I am sorry. I am sorry. I am sorry.", True, None, "loop"),  # a bigram, punctuation and case ignored
        ("the cat sat on the mat the cat sat on the mat the cat sat on the mat", True, None, None),  # 6 words: n > 4
        ("Sincere", True, "Dear Ms Lee, thank you for your letter.", "empty"),
        ("", True, None, "empty"),
        ("... — **", True, None, "empty"),  # nothing visible: no word holds a letter or a digit
        ("Paris", True, "Paris", None),  # as short as its reference: an answer
        ("Paris", True, None, "empty"),
        ("The capital of France is Paris, a city on the Seine", False, None, "unstopped"),
        ("The capital of France is Paris, a city on the Seine.", True, None, None),
        ("no, no, it is fine", True, None, None),  # twice in a row is not a loop
        ("1 2 3 4 5 6", True, None, None),
        ("go go go", False, None, "loop"),  # a loop cut off by the limit is reported as the loop
    ],
)
def test_degenerate_answers_are_the_near_empty_the_looping_and_the_unstopped(text, stopped, reference, reason):
    assert degenerate_reason(text, stopped, reference) == reason


def test_a_loop_is_an_ngram_of_up_to_four_words_three_times_in_a_row():
    assert repeated_ngram("a b c d a b c d a b c d".split()) == ("a", "b", "c", "d")
    assert repeated_ngram("a b c d e a b c d e a b c d e".split()) is None  # five words: beyond n = 4
    assert repeated_ngram("x a a y a a".split()) is None
    assert repeated_ngram("x y x y x z".split()) is None  # the third copy breaks off
    assert words("**Hi** — there ...") == ["**Hi**", "there"]


def completions(texts: list[str], stopped: bool = True) -> list[Completion]:
    return [Completion(t, len(t.split()) + 1, stopped) for t in texts]


def plain_ratio_ci(top: list[int], bottom: list[int], resamples: int, confidence: float) -> tuple[float, float]:
    """Independent: draw prompts with replacement, recompute sum(top) / sum(bottom), take percentiles."""
    rng = random.Random(7)
    draws = []
    for _ in range(resamples):
        idx = [rng.randrange(len(top)) for _ in top]
        under = sum(bottom[i] for i in idx)
        if under:
            draws.append(sum(top[i] for i in idx) / under)
    draws.sort()
    alpha = (1 - confidence) / 2
    return draws[int(alpha * len(draws))], draws[int((1 - alpha) * len(draws)) - 1]


def test_the_length_ratio_is_a_ratio_of_means_with_a_paired_bootstrap_interval():
    rng = random.Random(3)
    base = [rng.randint(20, 60) for _ in range(50)]
    tuned = [max(0, round(b * rng.uniform(0.2, 0.7))) for b in base]  # answers shrink to about 45%
    ratio, low, high = ratio_of_means_ci(tuned, base, resamples=4000, seed=0, confidence=0.9)
    assert ratio == pytest.approx(sum(tuned) / sum(base))
    ref_low, ref_high = plain_ratio_ci(tuned, base, 4000, 0.9)
    spread = ref_high - ref_low
    assert low == pytest.approx(ref_low, abs=0.05 * spread) and high == pytest.approx(ref_high, abs=0.05 * spread)
    assert low < ratio < high < 1
    # The same shrinkage on every prompt: no spread to resample.
    assert ratio_of_means_ci([5, 10, 15], [10, 20, 30], 200, 0, 0.95) == pytest.approx((0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="undefined"):
        ratio_of_means_ci([1, 2], [0, 0], 100, 0, 0.95)


def test_compare_behaviour_counts_words_shares_and_changes_as_by_hand():
    base = completions(
        ["The meeting moves to Tuesday at ten.", "Ashish, Ashish, Ashish", "It is four.", "Paris is the capital"]
    )
    base[3] = Completion(base[3].text, 48, False)  # cut off by max_new_tokens
    tuned = completions(["Tuesday.", "Sincere", "four", "Paris"])
    refs = ["The meeting is on Tuesday.", "Dear Ms Lee, thanks.", "four", "Paris"]
    scores = ({"chrf": [50.0, 10.0, 40.0, 60.0]}, {"chrf": [30.0, 5.0, 100.0, 100.0]})
    b = compare_behaviour(base, tuned, refs, scores, resamples=300, seed=0, confidence=0.95)
    assert b["answers"] == 4
    assert b["words_mean_base"] == (7 + 3 + 3 + 4) / 4 and b["words_mean_tuned"] == 1.0
    assert b["length_ratio"] == pytest.approx(4 / 17) and b["length_ratio_to_reference"] == pytest.approx(4 / 11)
    # base: loop, unstopped; tuned: "Tuesday." and "Sincere" are near-empty, "four" and "Paris" match their refs.
    assert b["degenerate_reasons"] == {
        "base": {"empty": 0, "loop": 1, "unstopped": 1},
        "tuned": {"empty": 2, "loop": 0, "unstopped": 0},
    }
    assert (b["degenerate_rate_base"], b["degenerate_rate_tuned"], b["degenerate_rise"]) == (0.5, 0.5, 0.0)
    assert (b["stop_rate_base"], b["stop_rate_tuned"]) == (0.75, 1.0) and b["stop_rate_change"] == 0.25
    assert b["chrf_base"] == 40.0 and b["chrf_tuned"] == 58.75 and b["chrf_change"] == pytest.approx(18.75)
    for figure in ("length_ratio", "degenerate_rise", "stop_rate_change", "chrf_change"):
        assert b[f"{figure}_ci_low"] <= b[figure] <= b[f"{figure}_ci_high"], figure
    assert compare_behaviour([], [], [], ({}, {}), 100, 0, 0.95) == {}
    assert "length_ratio" not in compare_behaviour(
        completions([""]), completions(["a b"]), ["x y"], ({}, {}), 50, 0, 0.95
    )


def test_a_reference_is_cut_to_what_an_answer_of_max_new_tokens_can_hold(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "two plus two is four. i am fine, thank you. " * 4
    cut = within_tokens(tokenizer, text, 6)
    assert text.startswith(cut) and 0 < len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 6
    assert within_tokens(tokenizer, "four.", 6) == "four."


PROMPTS = [
    "Rewrite this email politely: we cannot meet on Monday, can we meet on Tuesday at ten instead?",
    "List three uses of a paperclip.",
    "Explain why the sky is blue in two sentences.",
    "Give a title to a story about a lost dog that finds its way home.",
] * 5
BASE_ANSWERS = [
    "Dear team, I am afraid Monday does not work for me. Would Tuesday at ten suit you instead? Best regards.",
    "Holding papers together, resetting a device through a pinhole, and as a makeshift zipper pull.",
    "Sunlight is scattered by the air's molecules, and blue light is scattered most. So we see blue everywhere.",
    "The Long Way Home: a dog's journey back to the family that never stopped looking for him.",
] * 5


def suite_block(tuned_texts: list[str], informational: bool = False, floor: float | None = 0.5) -> dict:
    """A suite's behaviour block as the evaluate stage builds it (length against the base model's answers)."""
    block = compare_behaviour(completions(BASE_ANSWERS), completions(tuned_texts), BASE_ANSWERS, ({}, {}), 500, 0, 0.95)
    return with_budget(block, LENGTH_RATIO, floor, 0.1, "suite 'general'", informational)


def metrics_with(suite: dict, informational: bool = False) -> dict:
    test = compare_behaviour(completions(["four"] * 4), completions(["four"] * 4), ["four"] * 4, ({}, {}), 100, 0, 0.95)
    return {
        "behaviour": with_budget(test, LENGTH_RATIO_TO_REFERENCE, 0.5, 0.1, "test split"),
        "suites": {"general": {"behaviour": suite, "informational": informational}},
    }


def test_collapsed_answers_break_the_budget_and_the_refusal_names_the_suite_the_metric_and_the_figures():
    collapsed = ["Sincere", "Ashish, Ashish, Ashish, Ashish", "Blue.", "Dog"] * 5
    block = suite_block(collapsed)
    assert block["broken"] == ["length_ratio", "degenerate_rise", "collapsed_rise"]
    decision = decide("nll", 1.5, "key", "3", None, 0.0, budgets=behaviour_checks(metrics_with(block)))
    assert decision.alias == CHALLENGER and "\n" not in decision.reason
    assert decision.broken_budgets == (
        "suite 'general' length_ratio",
        "suite 'general' degenerate_rise",
        "suite 'general' collapsed_rise",
    )
    figures = (
        f"suite 'general' length_ratio {block['length_ratio']:.4f} (mean words {block['words_mean_base']:.2f} (base) "
        f"-> {block['words_mean_tuned']:.2f} (tuned)), CI [{block['length_ratio_ci_low']:.4f}, "
        f"{block['length_ratio_ci_high']:.4f}], floor 0.5"
    )
    assert figures in decision.reason and "degenerate_rise +1.0000" in decision.reason
    assert "share of degenerate answers 0.0000 (base) -> 1.0000 (tuned)" in decision.reason
    assert decision.reason.startswith("broke its behaviour budget on ") and decision.reason.endswith("not promoted")


def test_answers_that_keep_their_length_pass_and_an_informational_or_unset_budget_never_blocks():
    sound = [a.replace("Dear team, ", "") for a in BASE_ANSWERS]
    passed = decide("nll", 1.5, "key", "3", None, 0.0, budgets=behaviour_checks(metrics_with(suite_block(sound))))
    assert passed.alias == CHAMPION and "answers within their behaviour budgets" in passed.reason
    collapsed = ["Sincere", "Hi", "Blue.", "Dog"] * 5
    informational = metrics_with(suite_block(collapsed, informational=True), informational=True)
    noted = decide("nll", 1.5, "key", "3", None, 0.0, budgets=behaviour_checks(informational))
    assert noted.alias == CHAMPION and noted.broken_budgets == ()
    assert "informational behaviour budget broken on suite 'general' length_ratio" in noted.reason
    unset = suite_block(["Sincere", "Hi", "Blue.", "Dog"] * 5, floor=None)
    assert unset["broken"] == ["degenerate_rise", "collapsed_rise"] and "min_length_ratio" in unset
    checked = [c.label for c in behaviour_checks(metrics_with(unset))]
    assert checked == [
        "test split length_ratio_to_reference",
        "test split degenerate_rise",
        "test split collapsed_rise",
        "suite 'general' degenerate_rise",
        "suite 'general' collapsed_rise",
    ]


def test_a_collapse_is_gated_even_when_the_base_model_ran_into_max_new_tokens_on_every_prompt():
    """A base model cut off by the token limit on every prompt is 100% degenerate ("unstopped"), which leaves the
    degenerate rise no room; the rise of empty or looping answers still shows the tuned model's collapse."""
    base = completions(BASE_ANSWERS, stopped=False)
    tuned = completions(["Sincere", "Ashish, Ashish, Ashish, Ashish", "Blue.", "The dog."] * 5)
    block = with_budget(
        compare_behaviour(base, tuned, BASE_ANSWERS, ({}, {}), 500, 0, 0.95), LENGTH_RATIO, None, 0.1, "suite 'g'"
    )
    assert (block["degenerate_rate_base"], block["degenerate_rate_tuned"]) == (1.0, 0.75)
    assert (block["collapsed_rate_base"], block["collapsed_rate_tuned"]) == (0.0, 0.75)  # hand count: 15 of 20
    assert block["broken"] == ["collapsed_rise"]
    decision = decide("nll", 1.5, "key", "3", None, 0.0, budgets=behaviour_checks(metrics_with(block)))
    assert decision.alias == CHALLENGER and decision.broken_budgets == ("suite 'general' collapsed_rise",)
    assert "share of collapsed (empty or looping) answers 0.0000 (base) -> 0.7500 (tuned)" in decision.reason
