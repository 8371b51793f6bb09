"""Data preparation at scale: `sftops ingest` + `sftops format` against TRL 1.16's dataset preparation
(`load_dataset` + `SFTTrainer._prepare_dataset`, dataset_num_proc=2) on the same generated rows, each side in a
fresh process, at several sizes; wall time, peak RSS of the whole process tree and their ratios.

    python bench/bench_data_scale.py                         # 100k/300k/1M rows, SmolLM2-135M-Instruct, max_length 512
    python bench/bench_data_scale.py --rows 100000 --startup # one size, then train start-up from its cache
    python bench/bench_data_scale.py --rows 300 600 --model ../shared/models/stories260K/hf   # the dry run (tests)

The rows: one JSONL file of alpaca rows per size, written chunk by chunk from a seeded numpy generator
(instruction 10-30 words, an input of 1-60 words in 40% of rows, output 20-160 words; words drawn with their
frequencies from the text of ../shared/data, else from the standard library's docstrings), with about 2% exact
duplicates, 2% near duplicates (a copy of an earlier row with one or two words changed) and 1% bad rows
(missing output, empty instruction, a line that is not an object, invalid JSON). TRL takes no alpaca file with
bad rows, so the generator writes, in the same pass, the well-formed rows (duplicates included) as
conversational prompt/completion for TRL; that conversion is counted on neither side.

sftops: a project folder with a params.yaml (the file as its one source, model.base, model.max_length, any
--set), then `python -m sftops ingest` and `python -m sftops format`, timed separately. TRL: a fresh process
that loads the tokenizer (the same loader), builds SFTTrainer around a tiny random Llama of the tokenizer's
vocabulary (the trainer needs a model; a real one would add its weights to TRL's RSS), then load_dataset("json")
and _prepare_dataset with HF_DATASETS_CACHE in this size's folder (fresh: no Arrow cache is reused). Both
sides' times are whole-process wall times (imports and tokenizer loading included on both); peak RSS is
sampled every 0.2 s over the process and all its descendants (worker processes included), and the largest
single process's maximum comes from wait4.

--startup: after the largest size, train start-up from the formatted, cached set, in a fresh process that runs
`sftops train`'s function with this project's params.yaml (so the cache key, max_length, tokenizer and data,
matches the cache format wrote): the time from spawning it until it is ready to train, i.e. the start of the
held-out NLL it computes before step 1 (val split read, train split memory-mapped, model loaded, LoRA applied,
MLflow run open). bench_train_startup.py measures to the first optimizer step instead, with a fixed 1,000-row val
split; here the val split is 5% of the rows (50k at 1M) and scoring it with the real model is minutes of model
compute, so the first step is reached (its FirstStep handler) only when there is no val split.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CHUNK = 20_000
SEED = 13
EXACT_SHARE, NEAR_SHARE, BAD_SHARE = 0.02, 0.02, 0.01
POOL = 5_000  # recent well-formed rows that duplicates are copied from
SAMPLE_S = 0.2
TRL_NUM_PROC = 2
GB = 1e9


# ---------------------------------------------------------------- the rows


def corpus_words() -> list[str]:
    """Word occurrences of a real text (so the draw keeps their frequencies): ../shared/data's JSONL string
    values, else the standard library's docstrings. Tokenising cost depends on the words; a 40-word list would
    flatter both sides."""
    words: list[str] = []
    for path in sorted(SHARED_DATA.glob("*/*.jsonl")) if SHARED_DATA.is_dir() else []:
        for line in path.read_text(encoding="utf-8").splitlines():
            words += " ".join(_strings(json.loads(line))).split()
    if len(set(words)) >= 2_000:
        return words
    import ast
    import sysconfig

    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
        words += " ".join(filter(None, (ast.get_docstring(n) for n in nodes))).split()
    return words


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


class Vocabulary:
    def __init__(self, occurrences: list[str]) -> None:
        words, counts = np.unique(np.array(occurrences, dtype=object), return_counts=True)
        self.words = words.tolist()
        self.cumulative = np.cumsum(counts / counts.sum())

    def texts(self, rng: np.random.Generator, lengths: np.ndarray) -> list[str]:
        """One text per length, of that many words drawn with the corpus's frequencies."""
        picks = np.searchsorted(self.cumulative, rng.random(int(lengths.sum())), side="right")
        picks = np.minimum(picks, len(self.words) - 1).tolist()
        words, texts, at = self.words, [], 0
        for n in lengths.tolist():
            texts.append(" ".join([words[i] for i in picks[at : at + n]]))
            at += n
        return texts


def fresh_rows(rng: np.random.Generator, vocab: Vocabulary, n: int) -> list[dict]:
    instruction = vocab.texts(rng, rng.integers(10, 31, n))
    input_lengths = np.where(rng.random(n) < 0.4, rng.integers(1, 61, n), 0)
    inputs = vocab.texts(rng, input_lengths)
    output = vocab.texts(rng, rng.integers(20, 161, n))
    return [{"instruction": i, "input": x, "output": o} for i, x, o in zip(instruction, inputs, output)]


def near_copy(rng: np.random.Generator, vocab: Vocabulary, row: dict) -> dict:
    """The row with one or two words of its output replaced."""
    words = row["output"].split()
    for at in rng.integers(0, len(words), int(rng.integers(1, 3))).tolist():
        words[at] = vocab.words[int(rng.integers(0, len(vocab.words)))]
    return {**row, "output": " ".join(words)}


def bad_line(rng: np.random.Generator, row: dict) -> str:
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return json.dumps({"instruction": row["instruction"], "input": row["input"]})  # missing output
    if kind == 1:
        return json.dumps({**row, "instruction": "  "})  # empty instruction
    if kind == 2:
        return json.dumps([row["instruction"], row["output"]])  # not an object
    return json.dumps(row)[: -len(row["output"]) // 2]  # invalid JSON: cut off inside the output


def trl_line(row: dict) -> str:
    """The row as TRL's conversational prompt/completion, the user turn built as sftops' alpaca schema builds it."""
    prompt = "\n\n".join([row["instruction"], *([row["input"]] if row["input"].strip() else [])])
    return json.dumps(
        {
            "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": row["output"]}],
        }
    )


def write_rows(rows_path: Path, trl_path: Path, rows: int, vocab: Vocabulary) -> dict:
    """Writes `rows` lines of alpaca JSONL (and TRL's copy of the well-formed ones) chunk by chunk; returns counts."""
    rng = np.random.default_rng(SEED)
    counts = {"rows": 0, "exact_duplicates": 0, "near_duplicates": 0, "bad": 0, "trl_rows": 0}
    pool: list[dict] = []
    with rows_path.open("w") as ours, trl_path.open("w") as theirs:
        for start in range(0, rows, CHUNK):
            size = min(CHUNK, rows - start)
            draws = rng.random(size)
            fresh = iter(fresh_rows(rng, vocab, size))
            for draw in draws.tolist():
                row = next(fresh)
                if draw < EXACT_SHARE + NEAR_SHARE and pool:
                    earlier = pool[int(rng.integers(0, len(pool)))]
                    exact = draw < EXACT_SHARE
                    row = earlier if exact else near_copy(rng, vocab, earlier)
                    counts["exact_duplicates" if exact else "near_duplicates"] += 1
                elif draw < EXACT_SHARE + NEAR_SHARE + BAD_SHARE:
                    ours.write(bad_line(rng, row) + "\n")
                    counts["bad"] += 1
                    counts["rows"] += 1
                    continue
                ours.write(json.dumps(row) + "\n")
                theirs.write(trl_line(row) + "\n")
                counts["rows"] += 1
                counts["trl_rows"] += 1
                pool.append(row)
            del pool[:-POOL]
    return counts


# ---------------------------------------------------------------- measuring a process tree


def speed_probe() -> float:
    """Seconds of a fixed single-thread Python workload (best of three), measured just before each side: this
    machine's speed drifts by tens of percent over minutes, and two sides measured apart may not have run at
    the same speed. Printed beside the times, not used to correct them."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        sum(i * i for i in range(2_000_000))
        best = min(best, time.perf_counter() - started)
    return best


def tree_memory(pid: int) -> tuple[int, int]:
    """RSS and PSS summed over the process and its descendants. The RSS sum counts pages that forked workers
    share with their parent once per process; PSS splits them, so the two bound the tree's real footprint."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    rss = pss = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # a worker that ended between listing and reading
            continue
        rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
    return rss, pss


def run_measured(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Runs cmd in a fresh process; wall time, peak RSS summed over its process tree (sampled), the largest
    single process's maximum RSS and the tree's CPU time (wait4 counts reaped descendants), and its stdout."""
    with log.open("w") as err, (log.with_suffix(".out")).open("w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        peak = peak_pss = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss, pss = tree_memory(proc.pid)
            peak, peak_pss = max(peak, rss), max(peak_pss, pss)
            time.sleep(SAMPLE_S)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}) in {cwd}:\n{log.read_text()[-4000:]}")
    return {
        "wall_s": wall,
        "peak_tree_gb": peak / GB,
        "peak_tree_pss_gb": peak_pss / GB,
        "max_process_gb": usage.ru_maxrss * 1024 / GB,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "stdout": log.with_suffix(".out").read_text(),
    }


# ---------------------------------------------------------------- the two sides


def default_model() -> tuple[str, str | None]:
    """The product's default base: params.yaml's model.base and model.gguf_file."""
    model = yaml.safe_load((ROOT / "params.yaml").read_text())["model"]
    return model["base"], model.get("gguf_file")


def write_params(project: Path, args: argparse.Namespace) -> None:
    params = {
        "data": {"sources": [{"name": "synthetic", "path": "rows.jsonl", "schema": "alpaca"}]},
        "model": {"base": args.model, "gguf_file": args.gguf_file, "max_length": args.max_length},
        "tracking": {"registered_model_name": "data-scale-bench"},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def child_env(size_dir: Path) -> dict:
    env = dict(os.environ, HF_DATASETS_CACHE=str(size_dir / "hf-cache"), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "true")
    return env


def run_sftops(size_dir: Path, args: argparse.Namespace) -> dict:
    project = size_dir / "project"
    overrides = [a for kv in args.set for a in ("--set", kv)]
    result = {}
    for stage in ("ingest", "format"):
        cmd = [sys.executable, "-m", "sftops", stage, "--params", "params.yaml", *overrides]
        result[stage] = run_measured(cmd, project, child_env(size_dir), size_dir / f"{stage}.log")
    stats = json.loads((project / "data" / "curated" / "stats.json").read_text())
    result["stats"] = {
        **{k: stats[k] for k in ("read", "rejected", "duplicates", "kept")},
        "dropped_too_long": stats["overflow"]["dropped_too_long"],
    }
    return result


def run_trl(size_dir: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--trl-child",
        str(size_dir / "rows.trl.jsonl"),
        "--model",
        args.model,
        "--gguf-file",
        args.gguf_file or "",
        "--max-length",
        str(args.max_length),
    ]
    result = run_measured(cmd, size_dir, child_env(size_dir), size_dir / "trl.log")
    result["inner"] = json.loads([ln for ln in result["stdout"].splitlines() if ln.startswith("{")][-1])
    return result


def trl_child(data_file: Path, args: argparse.Namespace) -> None:
    """TRL's side, in its own process: the timed part inside is load_dataset + _prepare_dataset."""
    import datasets
    from datasets import Dataset, load_dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from sftops.config import ModelConfig
    from sftops.modeling import load_tokenizer

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(
        ModelConfig(base=args.model, gguf_file=args.gguf_file or None, max_length=args.max_length)
    )
    tiny = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    sft_args = SFTConfig(
        output_dir=str(data_file.parent / "trl-out"),
        max_length=args.max_length,
        completion_only_loss=True,
        report_to=[],
        use_cpu=True,
        bf16=False,
        dataset_num_proc=TRL_NUM_PROC,
    )
    one = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}]
    )
    trainer = SFTTrainer(model=tiny, args=sft_args, train_dataset=one, processing_class=tokenizer)
    started = time.perf_counter()
    data = load_dataset("json", data_files=str(data_file), split="train")
    loaded = time.perf_counter()
    prepared = trainer._prepare_dataset(data, tokenizer, sft_args, False, None, "train")
    done = time.perf_counter()
    print(json.dumps({"load_s": loaded - started, "prepare_s": done - loaded, "rows_out": len(prepared)}), flush=True)


# ---------------------------------------------------------------- train start-up from the largest size's cache

STARTUP_OVERRIDES = ["train.max_steps=2", "train.micro_batch_size=8", "train.group_by_length=true"]


def startup_child(project: Path, overrides: list[str], spawned: float) -> None:
    """`sftops train`'s own function in this process, stopped when it is ready to train: at the start of the
    held-out NLL it computes before the first step (that pass over the val split, 5% of the rows, is model compute
    that grows with the data, not start-up), or at the first optimizer step (bench_train_startup's FirstStep)
    when there is no val split."""
    import logging

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_train_startup import FirstStep

    import sftops.stages.train as finetune
    from sftops.config import load_config

    def ready(_model, val_rows, *_args, **_kwargs):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        # TokenRows: the val split came memory-mapped from format's cache (a list: it was tokenised afresh)
        print(
            json.dumps(
                {
                    "event": "start of the held-out NLL before step 1",
                    "seconds": time.time() - spawned,
                    "cpu_s": usage.ru_utime + usage.ru_stime,
                    "peak_rss_mb": usage.ru_maxrss / 1024,
                    "val_rows": type(val_rows).__name__,
                }
            ),
            flush=True,
        )
        os._exit(0)

    finetune.score_rows = ready  # the measurement point, outside the library; held_out_nll looks the name up here
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    logger = logging.getLogger("sftops.stages.train")
    logger.setLevel(logging.INFO)
    logger.addHandler(FirstStep(spawned))
    finetune.run_train(load_config(project / "params.yaml", [*overrides, *STARTUP_OVERRIDES]))
    raise SystemExit("train ended without a held-out NLL or an optimizer step")


def run_startup(size_dir: Path, args: argparse.Namespace) -> dict:
    project = size_dir / "project"
    cmd = [
        sys.executable,
        __file__,
        "--startup-child",
        str(project),
        "--spawned",
        repr(time.time()),
        *[a for kv in args.set for a in ("--set", kv)],
    ]
    result = run_measured(cmd, project, child_env(size_dir), size_dir / "startup.log")
    result["inner"] = json.loads([ln for ln in result["stdout"].splitlines() if ln.startswith("{")][-1])
    return result


# ---------------------------------------------------------------- report


def workers_setting(overrides: list[str]) -> str:
    given = [kv.split("=", 1)[1] for kv in overrides if kv.startswith("data.workers=")]
    if given:
        return given[-1]
    from sftops.config import DataConfig

    field = DataConfig.model_fields.get("workers")
    return f"{field.default} (default)" if field is not None else "none (this sftops has no data.workers)"


def print_settings(args: argparse.Namespace, load: tuple[float, ...]) -> None:
    import psutil

    versions = []
    for name in ("trl", "datasets", "transformers", "tokenizers"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} absent")
    print(
        f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine {platform.node()}: "
        f"{os.cpu_count()} CPU cores, {psutil.virtual_memory().total / GB:.1f} GB RAM; load average before start "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"model {args.model}{' ' + args.gguf_file if args.gguf_file else ''}, "
        f"max_length {args.max_length}, rows {args.rows}, "
        f"sftops data.workers {workers_setting(args.set)}, --set {args.set or 'none'}, TRL dataset_num_proc "
        f"{TRL_NUM_PROC}; {', '.join(versions)}",
        flush=True,
    )


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def number(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "-"


def print_table(results: list[dict]) -> None:
    print(
        "\ndata preparation, sftops ingest + format vs TRL 1.16 load_dataset + _prepare_dataset "
        "(whole fresh processes; peak GB: RSS summed over the process tree):"
    )
    head = (
        f"{'rows':>10} {'ingest s':>9} {'format s':>9} {'format peak GB':>15} {'TRL s':>8} {'TRL peak GB':>12} "
        f"{'format/TRL time':>16} {'format/TRL RSS':>15} {'format us/row':>14} {'TRL us/row':>11}"
    )
    print(head)
    for r in results:
        ing, fmt, trl = r.get("ingest"), r.get("format"), r.get("trl")
        fmt_s, trl_s = fmt and fmt["wall_s"], trl and trl["wall_s"]
        fmt_gb, trl_gb = fmt and fmt["peak_tree_gb"], trl and trl["peak_tree_gb"]
        print(
            f"{r['rows']:>10,} {number(ing and ing['wall_s'], '.1f'):>9} {number(fmt_s, '.1f'):>9} "
            f"{number(fmt_gb, '.2f'):>15} {number(trl_s, '.1f'):>8} {number(trl_gb, '.2f'):>12} "
            f"{ratio(fmt_s, trl_s):>16} {ratio(fmt_gb, trl_gb):>15} "
            f"{number(fmt_s and fmt_s / r['rows'] * 1e6, '.0f'):>14} "
            f"{number(trl_s and trl_s / r['rows'] * 1e6, '.0f'):>11}"
        )
    print(
        "targets: format/TRL time <= 0.5 at every size, format/TRL RSS <= 1, format us/row at the largest size "
        "<= at the smallest"
    )
    if len(results) > 1:
        first, last = results[0], results[-1]
        for side in ("format", "trl"):
            if side in first and side in last:
                per_row = [x[side]["wall_s"] / x["rows"] for x in (first, last)]
                print(
                    f"{side} time per row, {last['rows']:,} vs {first['rows']:,} rows: {per_row[1] / per_row[0]:.2f}x"
                )
    print("\ndetails per size:")
    for r in results:
        parts = [f"rows {r['rows']:,} (generated: {r['generated']})", f"load average at start {r['load']}"]
        for side in ("ingest", "format", "trl"):
            if side in r:
                m = r[side]
                parts.append(
                    f"{side}: CPU {m['cpu_s']:.1f} s, tree peak PSS {m['peak_tree_pss_gb']:.2f} GB, largest process "
                    f"{m['max_process_gb']:.2f} GB"
                )
        if "format" in r and "trl" in r:
            # CPU seconds count the workers too; on a machine shared with other jobs they move less than wall time
            parts.append(
                f"format/TRL peak PSS {ratio(r['format']['peak_tree_pss_gb'], r['trl']['peak_tree_pss_gb'])}, "
                f"format/TRL CPU {ratio(r['format']['cpu_s'], r['trl']['cpu_s'])}"
            )
        probes = [f"{side} {r[side]['probe_s']:.3f} s" for side in ("format", "trl") if "probe_s" in r.get(side, {})]
        if probes:
            parts.append(f"speed probe just before each side (lower is faster): {', '.join(probes)}")
        if "stats" in r:
            parts.append(f"format stats {r['stats']}")
        if "trl" in r:
            parts.append(
                f"TRL inside its process: load_dataset {r['trl']['inner']['load_s']:.1f} s, _prepare_dataset "
                f"{r['trl']['inner']['prepare_s']:.1f} s, {r['trl']['inner']['rows_out']:,} rows"
            )
        print("  " + "; ".join(parts))


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    base, gguf = default_model()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--model", default=None, help=f"model.base (default: params.yaml's, {base})")
    ap.add_argument(
        "--gguf-file",
        default=None,
        help=f"model.gguf_file (default: params.yaml's with the default model, {gguf}; none with --model)",
    )
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temp folder, removed)")
    ap.add_argument("--sides", nargs="+", choices=("sftops", "trl"), default=["sftops", "trl"])
    ap.add_argument("--startup", action="store_true", help="train start-up from the largest size's cache")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to sftops (repeatable)")
    ap.add_argument("--trl-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--startup-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        args.model, args.gguf_file = base, gguf if args.gguf_file is None else args.gguf_file
    args.gguf_file = args.gguf_file or None
    if Path(args.model).exists():  # a local folder: the stages run in the project folder, so make it absolute
        args.model = str(Path(args.model).resolve())
    return args


def measure_size(rows: int, folder: Path, vocab: Vocabulary, args: argparse.Namespace, keep: bool) -> dict:
    size_dir = folder / f"rows-{rows}"
    (size_dir / "project").mkdir(parents=True)
    write_params(size_dir / "project", args)
    generated = write_rows(size_dir / "project" / "rows.jsonl", size_dir / "rows.trl.jsonl", rows, vocab)
    result = {"rows": rows, "generated": generated, "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    for side in args.sides:  # in the order given: --sides trl sftops runs TRL first
        probe = speed_probe()
        if side == "sftops":
            result.update(run_sftops(size_dir, args))
            result["format"]["probe_s"] = probe
        else:
            result["trl"] = run_trl(size_dir, args)
            result["trl"]["probe_s"] = probe
    if not keep:
        shutil.rmtree(size_dir)
    print(
        json.dumps(
            {k: v for k, v in result.items() if k in ("rows", "generated", "stats")}
            | {side: round(result[side]["wall_s"], 1) for side in ("ingest", "format", "trl") if side in result}
        ),
        flush=True,
    )
    return result


def main() -> None:
    args = parse_args()
    if args.trl_child:
        return trl_child(args.trl_child, args)
    if args.startup_child:
        return startup_child(args.startup_child, args.set, args.spawned)
    print_settings(args, os.getloadavg())
    vocab = Vocabulary(corpus_words())
    print(f"vocabulary: {len(vocab.words):,} distinct words", flush=True)
    with tempfile.TemporaryDirectory(prefix="sftops-data-scale-") as tmp:
        folder = args.workdir or Path(tmp)
        largest = max(args.rows) if args.startup and "sftops" in args.sides else None
        results = [
            measure_size(rows, folder, vocab, args, keep=args.workdir is not None or rows == largest)
            for rows in args.rows
        ]
        print_table(results)
        if largest is not None:
            print_startup(run_startup(folder / f"rows-{largest}", args), largest)


def print_startup(startup: dict, rows: int) -> None:
    inner = startup["inner"]
    seconds, event = inner.get("seconds", inner.get("first_step_s")), inner.get("event", "first optimizer step")
    print(
        f"\ntrain start-up from the {rows:,}-row formatted cache (LoRA, {', '.join(STARTUP_OVERRIDES)}): "
        f"{seconds:.1f} s to the {event}, {inner['cpu_s']:.1f} CPU s, peak RSS {inner['peak_rss_mb']:.0f} MB "
        f"(tree peak sampled {startup['peak_tree_gb']:.2f} GB); val rows as {inner.get('val_rows', '?')}"
    )


if __name__ == "__main__":
    main()
