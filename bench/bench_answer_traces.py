"""How long an evaluation takes to log its answers as traces (tracking/traces.py), against logging the same rows as
one generations table (mlflow.log_table, what every evaluation logged before): the default run's 16 test prompts and
48 general-suite prompts, answers of 48 tokens' worth of words, on a fresh SQLite store in a temporary folder.

    python bench/bench_answer_traces.py                 # 16 + 48 rows, 3 repeats
    python bench/bench_answer_traces.py --test-rows 64 --suite-rows 192 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

WORDS = "the quick brown fox jumps over the lazy dog while a calm river runs past old stone walls".split()


def table(rows: int, source: str, seed: int) -> dict[str, list]:
    """A generations table as review.py writes it, with answers of about 36 words."""

    def text(i: int, shift: int) -> str:
        return " ".join(WORDS[(i * 7 + shift + k) % len(WORDS)] for k in range(36))

    out: dict[str, list] = {
        "id": [f"{seed:02d}{i:030d}" for i in range(rows)],
        "source": [source] * rows,
        "prompt": [f"Question {i}: {text(i, 1)[:120]}?" for i in range(rows)],
        "reference": [text(i, 2) for i in range(rows)],
        "base_output": [text(i, 3) for i in range(rows)],
        "tuned_output": [text(i, 4) for i in range(rows)],
    }
    for name in ("exact_match", "rouge_l", "chrf", "new_tokens", "nll"):
        for who in ("base", "tuned"):
            out[f"{who}_{name}"] = [float((i * 13 + len(who)) % 7) for i in range(rows)]
    out["base_degenerate"] = [""] * rows
    out["tuned_degenerate"] = ["loop" if i % 9 == 0 else "" for i in range(rows)]
    return out


def once(test_rows: int, suite_rows: int) -> tuple[float, float, int]:
    import mlflow

    from sftops.tracking.traces import log_answer_traces

    tables = {"test": table(test_rows, "qa", 1), "general": table(suite_rows, "general", 2)}
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        experiment = mlflow.create_experiment("bench", artifact_location=Path(tmp, "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            model = mlflow.initialize_logged_model(name="bench").model_id
            started = time.perf_counter()
            for name, rows in tables.items():
                mlflow.log_table(rows, artifact_file=f"eval/{name}.json")
            as_table = time.perf_counter() - started
            started = time.perf_counter()
            count = log_answer_traces(tables, "bench/1", model)
            as_traces = time.perf_counter() - started
    return as_traces, as_table, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-rows", type=int, default=16, help="test prompts answered (evaluate.num_generations)")
    parser.add_argument("--suite-rows", type=int, default=48, help="suite prompts answered (the general suite: 48)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "true")  # MLflow's default, said in the output
    runs = [once(args.test_rows, args.suite_rows) for _ in range(args.repeats)]
    traces, tables = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    count = runs[0][2]
    print(f"answer traces on a fresh SQLite store ({os.cpu_count()} CPUs, median of {args.repeats})")
    print("| logged as | rows | seconds | ms per row |\n|---|---|---|---|")
    print(f"| traces (tracking/traces.py) | {count} | {traces:.2f} | {1000 * traces / count:.0f} |")
    print(f"| one table per suite (mlflow.log_table) | {count} | {tables:.2f} | {1000 * tables / count:.1f} |")
    print(
        f"traces / table: {traces / tables:.1f}x (MLFLOW_ENABLE_ASYNC_TRACE_LOGGING="
        f"{os.environ['MLFLOW_ENABLE_ASYNC_TRACE_LOGGING']})"
    )


if __name__ == "__main__":
    main()
