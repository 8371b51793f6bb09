"""What fine-tuning did to how the model answers, beside how likely it finds the references: answer length,
degenerate answers (near-empty, looping, never ending their turn) and the stop rate, base against tuned on the
same sampled prompts, each with a paired bootstrap interval (evaluate/comparison.py). Pure: answers and references
in, figures out."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sftops.evaluate.comparison import mean_delta_ci, ratio_of_means_ci
from sftops.evaluate.textmetrics import normalize

if TYPE_CHECKING:
    from sftops.evaluate.generation import Completion

MIN_WORDS = 2  # fewer is near-empty: "Sincere" as a rewritten email
LOOP_MAX_N, LOOP_REPEATS = 4, 3  # a word n-gram, n up to 4, three times in a row: "Ashish, Ashish, Ashish"
EMPTY, LOOP, UNSTOPPED = "empty", "loop", "unstopped"
COLLAPSED = (EMPTY, LOOP)

_ALNUM = re.compile(r"[^\W_]")


def words(text: str) -> list[str]:
    """The whitespace-separated pieces of text that hold a letter or a digit: '**', '—' and '...' are not words."""
    return [piece for piece in text.split() if _ALNUM.search(piece)]


def repeated_ngram(
    tokens: Sequence[str], max_n: int = LOOP_MAX_N, repeats: int = LOOP_REPEATS
) -> tuple[str, ...] | None:
    """The first n-gram of tokens (shortest n first, n from 1 to max_n) that occurs `repeats` or more times in a
    row, each copy right after the last (["i", "am", "i", "am", "i", "am"] -> ("i", "am")); None without one."""
    for n in range(1, max_n + 1):
        for start in range(len(tokens) - n * repeats + 1):
            gram = list(tokens[start : start + n])
            if all(list(tokens[start + k * n : start + (k + 1) * n]) == gram for k in range(1, repeats)):
                return tuple(gram)
    return None


def degenerate_reason(text: str, stopped: bool, reference: str | None = None) -> str | None:
    """Why an answer is degenerate, None when it is not; the first of these that applies:
    - "empty": fewer than 2 words (see words(): nothing visible counts 0), or fewer words than its reference when
      the reference is shorter still (a one-word answer to a one-word reference is an answer, not a collapse);
    - "loop": a word n-gram, n from 1 to 4, repeated 3 or more times in a row, words compared lower-cased without
      punctuation ("Ashish, Ashish, Ashish", "I am sorry. I am sorry. I am sorry.");
    - "unstopped": generation ran into max_new_tokens instead of ending its turn (Completion.stopped False)."""
    least = MIN_WORDS if reference is None else min(MIN_WORDS, len(words(reference)))
    if len(words(text)) < least:
        return EMPTY
    if repeated_ngram(words(normalize(text))) is not None:
        return LOOP
    return None if stopped else UNSTOPPED


def degenerate_reasons(completions: Sequence[Completion], references: Sequence[str]) -> list[str | None]:
    """degenerate_reason of each answer, against the reference of its prompt."""
    return [degenerate_reason(c.text, c.stopped, r) for c, r in zip(completions, references, strict=True)]


def within_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """text cut to its first max_tokens tokens: the most of a reference an answer of max_new_tokens can hold, so
    that a length cut by the generation limit is compared with a reference cut the same way."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def compare_behaviour(
    base: Sequence[Completion],
    tuned: Sequence[Completion],
    references: Sequence[str],
    scores: tuple[Mapping[str, Sequence[float]], Mapping[str, Sequence[float]]],
    resamples: int,
    seed: int,
    confidence: float,
) -> dict[str, Any]:
    """Base against tuned answers to the same prompts (references: one per prompt, cut as within_tokens cuts it; scores:
    each side's per-answer text metrics), every change with its paired-bootstrap interval: mean words and the length
    ratios tuned / base and tuned / reference (ratios of means), the share of degenerate answers and its rise (with the
    count of each reason), the share of collapsed ones (empty or looping) and its rise, the stop rate and its change,
    and each text metric's change. Empty when nothing was generated; a ratio whose denominator has no words is left
    out."""
    if not (len(base) == len(tuned) == len(references)):
        raise ValueError(f"paired answers needed (got {len(base)} base, {len(tuned)} tuned, {len(references)} refs)")
    if not base:
        return {}
    stats = (resamples, seed, confidence)
    base_words, tuned_words = [len(words(c.text)) for c in base], [len(words(c.text)) for c in tuned]
    reference_words = [len(words(r)) for r in references]
    out: dict[str, Any] = {
        "answers": len(base),
        "words_mean_base": _mean(base_words),
        "words_mean_tuned": _mean(tuned_words),
        "words_mean_reference": _mean(reference_words),
    }
    out.update(_ratio("length_ratio", tuned_words, base_words, stats))
    out.update(_ratio("length_ratio_to_reference", tuned_words, reference_words, stats))
    base_reasons, tuned_reasons = degenerate_reasons(base, references), degenerate_reasons(tuned, references)
    base_flags, tuned_flags = [r is not None for r in base_reasons], [r is not None for r in tuned_reasons]
    out.update(_paired_means("degenerate_rate", "degenerate_rise", base_flags, tuned_flags, stats))
    # Empty or looping only: a base model that runs into max_new_tokens on most prompts leaves the degenerate rise
    # no room to show a tuned model's collapse ("Sincere"), which this rise still shows.
    base_collapsed, tuned_collapsed = ([r in COLLAPSED for r in reasons] for reasons in (base_reasons, tuned_reasons))
    out.update(_paired_means("collapsed_rate", "collapsed_rise", base_collapsed, tuned_collapsed, stats))
    out["degenerate_reasons"] = {"base": _reason_counts(base_reasons), "tuned": _reason_counts(tuned_reasons)}
    out.update(
        _paired_means("stop_rate", "stop_rate_change", [c.stopped for c in base], [c.stopped for c in tuned], stats)
    )
    base_scores, tuned_scores = scores
    for name, values in base_scores.items():
        if values:
            out.update(_paired_means(name, f"{name}_change", values, tuned_scores[name], stats))
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _ratio(name: str, numerator: list[int], denominator: list[int], stats: tuple[int, int, float]) -> dict[str, float]:
    if sum(denominator) == 0:
        return {}
    ratio, low, high = ratio_of_means_ci(numerator, denominator, *stats)
    return {name: ratio, f"{name}_ci_low": low, f"{name}_ci_high": high}


def _paired_means(
    name: str, change: str, base: Sequence[float], tuned: Sequence[float], stats: tuple[int, int, float]
) -> dict[str, float]:
    """Each side's mean of a per-answer value (a 0/1 flag's mean is a share) and the paired change with its CI."""
    delta, low, high = mean_delta_ci([float(v) for v in base], [float(v) for v in tuned], *stats)
    return {
        f"{name}_base": _mean([float(v) for v in base]),
        f"{name}_tuned": _mean([float(v) for v in tuned]),
        change: delta,
        f"{change}_ci_low": low,
        f"{change}_ci_high": high,
    }


def _reason_counts(reasons: Sequence[str | None]) -> dict[str, int]:
    counted = Counter(reasons)
    return {reason: counted[reason] for reason in (EMPTY, LOOP, UNSTOPPED)}
