"""Scores of a generated answer against its reference."""

from __future__ import annotations

import functools
import re
import string

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower case, no punctuation, single spaces: 'Hello, World!' == 'hello world'."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on normalised words (longest common subsequence)."""
    p, r = normalize(prediction).split(), normalize(reference).split()
    if not p or not r:
        return float(p == r)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _canonical_number(text: str) -> str:
    """'$1,234.50' -> '1234.5'; '18.0' -> '18': the same quantity compares equal."""
    digits = text.replace(",", "").replace("$", "").rstrip(".")
    if "." in digits:
        digits = digits.rstrip("0").rstrip(".")
    return digits


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return _canonical_number(numbers[-1]) if numbers else None


def extract_answer(text: str, rule: str) -> str | None:
    """The part of an answer that exact match compares, under the rule set in evaluate.answer_extraction:
    'normalized' (the whole text, normalised), 'gsm8k' (the number after the last '####'; None without one),
    'last_number' (the last number anywhere). None means no answer could be extracted."""
    if rule == "normalized":
        return normalize(text)
    if rule == "gsm8k":
        if "####" not in text:
            return None
        return _last_number(text.rsplit("####", 1)[1].split("\n", 1)[0])
    if rule == "last_number":
        return _last_number(text)
    raise ValueError(f"unknown answer extraction rule {rule!r}")


def extracted_match(prediction: str, reference: str, rule: str) -> float:
    """Exact match of the extracted answers; a prediction without an extractable answer never matches."""
    predicted, expected = extract_answer(prediction, rule), extract_answer(reference, rule)
    return float(predicted is not None and predicted == expected)


@functools.cache
def _chrf_scorer():
    from sacrebleu.metrics import CHRF

    return CHRF()  # character 6-grams, beta 2, no word n-grams: sacrebleu's defaults


def chrf(prediction: str, reference: str) -> float:
    """Sentence chrF (0-100) as sacrebleu computes it."""
    return _chrf_scorer().sentence_score(prediction, [reference]).score


def length_stats(texts: list[str], prefix: str) -> dict[str, float]:
    """Mean, median and max length in words."""
    words = sorted(len(t.split()) for t in texts)
    if not words:
        return {}
    mid = len(words) // 2
    median = words[mid] if len(words) % 2 else (words[mid - 1] + words[mid]) / 2
    return {
        f"{prefix}_words_mean": sum(words) / len(words),
        f"{prefix}_words_median": float(median),
        f"{prefix}_words_max": float(words[-1]),
    }
