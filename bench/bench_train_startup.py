"""Train start-up from a tokenised cache: wall time from process start to the first optimizer step, and peak RSS,
for a small and a large cached train split.

    python bench/bench_train_startup.py                          # 10,000 and 1,000,000 train rows
    python bench/bench_train_startup.py --rows 2000 5000 --val-rows 50   # the code path in seconds (tests)

For each size the script writes, in a temp folder, a curated dataset as the format stage leaves it: train/val/test
Parquet splits with the canonical schema (synthetic conversations, ~20-word prompts, 20-160-word responses) and the
tokenised cache through sftops' TokenCacheWriter (per row 30-150 prompt and 60-450 response tokens, random ids from
the model's vocabulary: ~340 tokens a row), keyed for the model's tokenizer so train takes it as valid; the files'
digests are recorded as the format stage records them (sftops.provenance.fingerprints.remember_digests, into
$SFTOPS_CACHE_DIR, here the dataset's own cache/ folder). The val and test splits have a fixed --val-rows rows on
every side: the held-out NLL before the first step scales with the validation rows, which is model compute, not
start-up. Then a fresh process runs `sftops train`'s own function (sftops.stages.train.run_train: LoRA on the model,
MLflow tracking into a temp SQLite store) and is stopped at the log line of its first optimizer step; the script
prints that time and the child's peak RSS per size, and their differences.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K" / "hf"
CHUNK = 20_000
WORDS = np.array(
    "the a cat dog sat ran on in park mat what is how why explain list two plus four number answer "
    "question model data train step loss token write short story about sun rain tree river".split()
)


def synthetic_text(rng: np.random.Generator, n: int, low: int, high: int) -> list[str]:
    counts = rng.integers(low, high + 1, n)
    words = WORDS[rng.integers(0, len(WORDS), int(counts.sum()))]
    cuts = np.cumsum(counts)[:-1]
    return [" ".join(part) for part in np.split(words, cuts)]


def write_split(path: Path, split: str, n: int, rng: np.random.Generator) -> list[str]:
    """A curated split of n synthetic two-turn conversations, written in row groups; returns the row ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sftops.data.store import SCHEMA

    ids: list[str] = []
    with pq.ParquetWriter(path, SCHEMA) as writer:
        for start in range(0, n, CHUNK):
            size = min(CHUNK, n - start)
            chunk_ids = [hashlib.sha256(f"{split}{i}".encode()).hexdigest() for i in range(start, start + size)]
            prompts, answers = synthetic_text(rng, size, 10, 30), synthetic_text(rng, size, 20, 160)
            messages = [
                [
                    {
                        "role": "user",
                        "content": p,
                        "weight": None,
                        "tool_calls": None,
                        "tool_call_id": None,
                        "name": None,
                    },
                    {
                        "role": "assistant",
                        "content": a,
                        "weight": None,
                        "tool_calls": None,
                        "tool_call_id": None,
                        "name": None,
                    },
                ]
                for p, a in zip(prompts, answers)
            ]
            table = pa.table(
                {
                    "id": chunk_ids,
                    "source": ["synthetic"] * size,
                    "origin": [f"synthetic.jsonl#{i}" for i in range(start, start + size)],
                    "split": [split] * size,
                    "messages": messages,
                    "tools": [None] * size,
                    "messages_as_trained": [None] * size,
                    "prompt_tokens_cut": [0] * size,
                    "response_tokens_lost": [0] * size,
                },
                schema=SCHEMA,
            )
            writer.write_table(table)
            ids += chunk_ids
    return ids


def write_tokens(writer, split: str, ids: list[str], rng: np.random.Generator, vocab: int) -> int:
    """Synthetic encodings in chunks: prompt tokens masked, response tokens supervised; returns the token count."""
    from sftops.encoded import IGNORE, Encoded

    tokens = 0
    for start in range(0, len(ids), CHUNK):
        part = ids[start : start + CHUNK]
        prompt, response = rng.integers(30, 151, len(part)), rng.integers(60, 451, len(part))
        lengths = prompt + response
        flat = rng.integers(3, vocab, int(lengths.sum()), dtype=np.int32)
        labels = flat.copy()
        ends = np.cumsum(lengths)
        starts = ends - lengths
        encodings = []
        for s, p, e in zip(starts.tolist(), prompt.tolist(), ends.tolist()):
            labels[s : s + p] = IGNORE
            encodings.append(Encoded(flat[s:e], labels[s:e]))
        writer.add(split, part, encodings, [False] * len(part), [0] * len(part))
        tokens += int(lengths.sum())
    return tokens


def config(model: Path) -> dict:
    """The train stage's params; paths are the defaults, relative to the dataset's folder (the child's cwd)."""
    return {
        "data": {"sources": [{"name": "synthetic", "path": "synthetic.jsonl"}]},
        "model": {"base": str(model), "max_length": 1024},
        "train": {"method": "lora", "micro_batch_size": 8, "max_steps": 2, "group_by_length": True},
        "tracking": {"registered_model_name": "startup-bench"},
    }


def use_cache_folder(folder: Path) -> None:
    """The dataset's own cache folder (the recorded digests), as a project's .sftops-cache/: build and child alike."""
    os.environ["SFTOPS_CACHE_DIR"] = str(folder / "cache")


def build(folder: Path, rows: int, val_rows: int, model: Path) -> dict:
    from sftops.config import Config
    from sftops.data.store import TokenCacheWriter, cache_key, split_file
    from sftops.modeling import load_tokenizer

    use_cache_folder(folder)
    cfg = Config.model_validate(config(model))
    curated = folder / cfg.paths.curated
    curated.mkdir(parents=True)
    rng = np.random.default_rng(rows)
    ids = {
        s: write_split(split_file(curated, s), s, n, rng)
        for s, n in (("train", rows), ("val", val_rows), ("test", val_rows))
    }
    tokenizer = load_tokenizer(cfg.model)
    tokens = 0
    with TokenCacheWriter(curated, cache_key(curated, tokenizer, cfg.model.max_length, cfg.data.overflow)) as writer:
        for split, split_ids in ids.items():
            tokens += write_tokens(writer, split, split_ids, rng, len(tokenizer))
    from sftops.layout import INGEST_REPORT, STATS

    for name in (STATS, INGEST_REPORT):  # the reports train logs with the run, as the format stage leaves them
        (curated / name).write_text(json.dumps({"bench": "synthetic rows from bench_train_startup.py"}) + "\n")
    from sftops.provenance.fingerprints import remember_digests

    remember_digests(curated)  # as the format stage ends: the files' digests recorded for train to find
    size = sum(f.stat().st_size for f in curated.rglob("*") if f.is_file())
    return {"tokens": tokens, "curated_bytes": size}


def built_once(folder: Path, rows: int, val_rows: int, model: Path) -> dict:
    """The dataset of this size, built now or (with --work) kept from an earlier run of the script."""
    record = folder / "built.json"
    if record.exists():
        return json.loads(record.read_text())
    started = time.perf_counter()
    built = {**build(folder, rows, val_rows, model), "build_s": round(time.perf_counter() - started, 1)}
    record.write_text(json.dumps(built) + "\n")
    return built


class FirstStep(logging.Handler):
    """Stops the child at the first 'train step' log line, printing the time since the parent spawned it."""

    def __init__(self, spawned: float) -> None:
        super().__init__()
        self.spawned = spawned

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("train step 1:"):
            usage = resource.getrusage(resource.RUSAGE_SELF)
            # CPU seconds too: on a machine shared with other jobs, wall time also counts the others' work
            print(
                json.dumps(
                    {
                        "first_step_s": time.time() - self.spawned,
                        "cpu_s": usage.ru_utime + usage.ru_stime,
                        "peak_rss_mb": usage.ru_maxrss / 1024,
                    }
                ),
                flush=True,
            )  # Linux reports KiB
            os._exit(0)


def child(folder: Path, model: Path, spawned: float) -> None:
    from sftops.config import Config
    from sftops.stages.train import run_train

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    use_cache_folder(folder)
    logger = logging.getLogger("sftops.stages.train")
    logger.setLevel(logging.INFO)
    logger.addHandler(FirstStep(spawned))
    run_train(Config.model_validate(config(model)))
    raise SystemExit("no optimizer step was logged")


def measure(folder: Path, model: Path) -> dict:
    spawned = time.time()
    cmd = [sys.executable, __file__, "--child", str(folder), "--model", str(model), "--spawned", repr(spawned)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=folder)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"train child failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000], help="train rows of each side")
    ap.add_argument("--val-rows", type=int, default=1000, help="val (and test) rows, the same on every side")
    ap.add_argument("--model", type=Path, default=STORIES)
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where to build the datasets and keep them for the next run (default: a temp folder)",
    )
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.model, args.spawned)
    if not args.model.exists():
        raise SystemExit(f"{args.model} not found: pass --model (a small Hugging Face causal LM folder)")
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for rows in args.rows:
            folder = (args.work or Path(tmp)) / f"rows-{rows}-val-{args.val_rows}"
            results.append(
                {"rows": rows, **built_once(folder, rows, args.val_rows, args.model), **measure(folder, args.model)}
            )
            print(json.dumps(results[-1]), flush=True)
    print(f"\ntrain start-up from the tokenised cache ({args.model.name}, LoRA, val/test {args.val_rows} rows each):")
    print(
        f"{'train rows':>12} {'tokens':>13} {'curated GB':>11} {'to 1st step s':>14} {'CPU s':>7} {'peak RSS MB':>12}"
    )
    for r in results:
        print(
            f"{r['rows']:>12,} {r['tokens']:>13,} {r['curated_bytes'] / 1e9:>11.2f} {r['first_step_s']:>14.1f} "
            f"{r['cpu_s']:>7.1f} {r['peak_rss_mb']:>12.0f}"
        )
    first, last = results[0], results[-1]
    print(
        f"largest - smallest: {last['first_step_s'] - first['first_step_s']:+.1f} s wall, "
        f"{last['cpu_s'] - first['cpu_s']:+.1f} s CPU, {last['peak_rss_mb'] - first['peak_rss_mb']:+.0f} MB peak RSS"
    )


if __name__ == "__main__":
    main()
