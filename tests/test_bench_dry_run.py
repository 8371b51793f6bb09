"""The GPU benchmark against TRL (bench/bench_gpu_vs_trl.py) runs its whole code path on the CPU with a tiny
model: the matched pair's first-step losses agree and the table is printed. No timing is asserted."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_dry_run_prints_the_table_and_matched_losses_agree():
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    cmd = [sys.executable, str(ROOT / "bench" / "bench_gpu_vs_trl.py"), "--device", "cpu", "--tiny", "--methods", "full",
           "--steps", "4", "--warmup", "1", "--budget-s", "60"]
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
