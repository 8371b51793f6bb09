"""The GPU benchmark against TRL (bench/bench_gpu_vs_trl.py) runs its whole code path on the CPU with a tiny
model: the matched pair's first-step losses agree and the table is printed. The start-up and data-scale benchmarks
run at a few hundred rows. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_dry_run_prints_the_table_and_matched_losses_agree():
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "bench_gpu_vs_trl.py"),
        "--device",
        "cpu",
        "--tiny",
        "--methods",
        "full",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--budget-s",
        "60",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "full: matched first-step loss" in out and "(within 1e-05)" in out, out[-3000:]
    assert "sup. tok/s" in out and "matmul ceiling" in out


def test_train_startup_benchmark_dry_run_prints_both_sizes():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_train_startup.py"), "--rows", "200", "400", "--val-rows", "20"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.split("train start-up from the tokenised cache")[-1]
    assert "200" in table and "400" in table and "to 1st step s" in table and "largest - smallest" in table


def test_data_scale_benchmark_dry_run_prints_both_sizes_ratios_and_startup(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "bench_data_scale.py"),
        "--rows",
        "300",
        "600",
        "--model",
        str(ROOT.parent / "shared" / "models" / "stories260K" / "hf"),
        "--workdir",
        str(tmp_path),
        "--startup",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "train start-up from the 600-row formatted cache" in done.stdout
        and "s to the start of the held-out NLL before step 1" in done.stdout
    )
    assert "val rows as TokenRows" in done.stdout  # read from the cache format wrote, not tokenised afresh
    table = done.stdout.split("data preparation, sftops ingest + format vs TRL")[-1].split("details per size")[0]
    rows = [line.split() for line in table.splitlines() if line.strip().split(" ")[0] in ("300", "600")]
    assert [r[0] for r in rows] == ["300", "600"], done.stdout[-3000:]
    for r in rows:  # ingest, format, peak, TRL, peak, two ratios, two times per row: all measured, none missing
        assert len(r) == 10 and "-" not in r, r
        fmt_s, trl_s, fmt_gb, trl_gb, time_ratio, rss_ratio = map(float, (r[2], r[4], r[3], r[5], r[6], r[7]))
        assert time_ratio == pytest.approx(fmt_s / trl_s, rel=0.03)
        assert rss_ratio == pytest.approx(fmt_gb / trl_gb, rel=0.03)
    assert "format time per row, 600 vs 300 rows:" in done.stdout
    # the generated file holds the bad rows and duplicates the format stage is to find
    generated = json.loads((tmp_path / "rows-600" / "project" / "data" / "curated" / "stats.json").read_text())
    assert generated["read"] == 600 and generated["rejected"] > 0 and generated["duplicates"] > 0
