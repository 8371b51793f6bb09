"""Serving parity: the model a deployer serves answers as the model that was evaluated. On a seeded sample of test
rows, the evaluated model's greedy answer (one prompt at a time, as a server answers) and response NLL are
compared with the served artifact's (tracking/parity.py loads it as `mlflow models serve` does, in a fresh
process): the same text, NLL within a tolerance, and the same stop: where the evaluated model stopped at its end
of turn the served one stops too, and where it was cut at max_new_tokens so is the served one. Pure: figures in,
a verdict out; the gate reads the verdict from metrics.json."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

PARITY_BLOCK = "serving_parity"  # metrics.json's key


@dataclass(frozen=True)
class Answer:
    """One model's result on one parity row."""

    text: str
    stopped: bool  # ended on EOS / end of turn, not at the token limit
    nll: float  # response NLL, nats per token


def parity_rows(n_rows: int, wanted: int, seed: int) -> list[int]:
    """The sampled rows' indices, in order: the same seed, the same rows."""
    return sorted(random.Random(seed).sample(range(n_rows), min(wanted, n_rows)))


def compare(
    ids: list[str], evaluated: list[Answer], served: list[Answer], tolerance: float, model_uri: str
) -> dict[str, Any]:
    """The parity block: counts, the largest NLL gap, and the first row that differs with both answers."""
    equal = [e.text == s.text for e, s in zip(evaluated, served)]
    # both ways: an answer the served model ends early (a stop token too many) differs as one it runs past
    stops = [s.stopped == e.stopped for e, s in zip(evaluated, served)]
    gaps = [abs(e.nll - s.nll) for e, s in zip(evaluated, served)]
    differs = [i for i in range(len(ids)) if not equal[i] or not stops[i] or gaps[i] > tolerance]
    block: dict[str, Any] = {
        "checked": True,
        "model_uri": model_uri,
        "rows": len(ids),
        "answers_equal": sum(equal),
        "stops_honoured": sum(stops),
        "stops_expected": sum(e.stopped for e in evaluated),
        "max_nll_gap": max(gaps, default=0.0),
        "nll_tolerance": tolerance,
        "passed": not differs,
    }
    if differs:
        i = differs[0]
        block["first_difference"] = {"row": ids[i], "evaluated": asdict(evaluated[i]), "served": asdict(served[i])}
    return block


def not_checked(reason: str) -> dict[str, Any]:
    return {"checked": False, "passed": True, "reason": reason}


def not_served(model_uri: str, error: str) -> dict[str, Any]:
    """The block of a model that did not load or answer as a server runs it: a failure."""
    return {"checked": True, "passed": False, "model_uri": model_uri, "error": error}


def summary(block: dict[str, Any]) -> str:
    """One line: the figures, and for a failure the row and both answers."""
    if not block.get("checked"):
        return f"not checked ({block.get('reason', 'no parity block')})"
    if "error" in block:
        return f"failed: {block['error']}"
    figures = (
        f"{block['answers_equal']}/{block['rows']} greedy answers equal, {block['stops_honoured']}/{block['rows']} "
        f"stops honoured, max response NLL gap {block['max_nll_gap']:.2e} nats/token "
        f"(tolerance {block['nll_tolerance']:g}) on {block['model_uri']}"
    )
    if block["passed"]:
        return f"passed: {figures}"
    d = block["first_difference"]
    e, s = d["evaluated"], d["served"]
    return (
        f"failed: {figures}; test row {d['row']}: evaluated {e['text'][:200]!r} (NLL {e['nll']:.4f}, "
        f"{'stopped' if e['stopped'] else 'cut at max_new_tokens'}), served {s['text'][:200]!r} "
        f"(NLL {s['nll']:.4f}, {'stopped' if s['stopped'] else 'cut at max_new_tokens'})"
    )


def verdict(metrics: dict[str, Any]) -> tuple[bool, str]:
    """For the gate: whether the served model is the evaluated one, and the line that says so. An evaluation
    without a parity block (older metrics.json) or with the check off passes, said as not checked."""
    block = metrics.get(PARITY_BLOCK) or not_checked("no serving parity recorded")
    line = f"serving parity {summary(block)}"
    return bool(block["passed"]), (
        line if block["passed"] else f"the served model differs from the evaluated one: {line}"
    )
