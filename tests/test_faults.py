"""Faults a real run meets, injected for real: the MLflow server killed mid-run (a real `mlflow server`), the
disk filling up while a stage writes (RLIMIT_FSIZE, so the write fails with the kernel's own error), and the
GPU running out of memory. Each either loses nothing or stops with one clear line, leaving the earlier outputs
usable. (SIGKILL during training and during a checkpoint write: tests/test_training_engine.py.)"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import (
    arithmetic_rows,
    error_lines,
    formatted,
    free_port,
    sftops,
    sh,
    tool_env,
    write_jsonl,
    write_project,
)
from sftops.data.store import read_split
from sftops.errors import TRANSIENT_EXIT, GpuMemoryError, StorageError
from sftops.stages.evaluate import run_evaluate
from sftops.stages.ingest import run_ingest
from sftops.stages.train import run_train
from sftops.train import checkpoint
from sftops.train.checkpoint import checkpoint_folder
from test_training_engine import losses

pytestmark = pytest.mark.reliability
SRC = str(Path(__file__).parents[1] / "src")


@pytest.fixture
def project(project_folder, tiny_model):
    """A folder with a source ingested and formatted and params.yaml (LoRA, checkpoints every 2 steps)."""
    train = {"method": "lora", "max_steps": 12, "micro_batch_size": 4, "grad_accum_steps": 1, "learning_rate": 0.01}
    sources = [{"name": "qa", "path": str(write_jsonl("qa.jsonl", arithmetic_rows(80)))}]
    return formatted(write_project(tiny_model, sources, train={**train, "checkpoint_every": 2}))


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {path.name}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.1)


def test_a_killed_mlflow_server_loses_no_training(project, mlflow_server_process, tmp_path, monkeypatch, figures):
    """Killed at step 3 and back before the end: every step's metrics reach the server. Killed for good: the run
    stops with one line after its checkpoints are safe, models/ untouched; re-run with the server back: it resumes
    from the last checkpoint to the same losses."""
    server, cfg = mlflow_server_process, project
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    # MLflow's own retry settings, short for the test (the defaults retry for minutes).
    env = {
        "MLFLOW_TRACKING_URI": server.url,
        "SFTOPS_PAUSE_DIR": str(pauses),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }

    # 1. The server dies at step 3 and comes back before the end of training.
    proc = sftops("train", wait=False, env={**env, "SFTOPS_PAUSE": "after_step:3,tracking_flush"})
    wait_for(pauses / "after_step:3.reached", proc)
    server.stop(signal.SIGKILL)
    (pauses / "after_step:3.go").touch()
    wait_for(pauses / "tracking_flush.reached", proc)
    server.start()
    (pauses / "tracking_flush.go").touch()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    first = json.loads(Path("models/run.json").read_text())
    history = MlflowClient(server.url).get_metric_history(first["run_id"], "train_loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 13))  # none lost
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(losses(first))
    figures["faults injected"] += 1
    figures["faults survived"] += 1
    figures["MLflow server kills survived"] += 1

    # 2. The server dies at step 3 for good: a clear stop, checkpoints kept, the previous models/ untouched.
    for f in pauses.iterdir():
        f.unlink()
    proc = sftops("train", wait=False, env={**env, "SFTOPS_PAUSE": "after_step:3"})
    wait_for(pauses / "after_step:3.reached", proc)
    server.stop(signal.SIGKILL)
    (pauses / "after_step:3.go").touch()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == TRANSIENT_EXIT and "Traceback" not in err, err[-3000:]  # worth another try, later
    line = error_lines(err)
    assert len(line) == 1 and "MLflow tracking server" in line[0] and "stopped answering" in line[0], err[-3000:]
    assert "models is unchanged; checkpoints in checkpoints are kept" in line[0]
    assert json.loads(Path("models/run.json").read_text())["run_id"] == first["run_id"]
    folder = checkpoint_folder(cfg)
    last = checkpoint.latest(folder)
    assert last is not None and last.name == "step-000010" and checkpoint.is_valid(last)
    unsent = list(Path(cfg.paths.checkpoints).glob("unsent-metrics-*.jsonl"))
    assert len(unsent) == 1 and str(unsent[0]) in line[0]
    assert {json.loads(x)["step"] for x in unsent[0].read_text().splitlines() if "train_loss" in x} == set(range(4, 13))
    figures["faults injected"] += 1
    figures["faults survived"] += 1
    figures["MLflow server kills survived"] += 1

    # 3. The server is back: the re-run (here, in this process) resumes from step 10 and ends with the
    # uninterrupted run's losses.
    server.start()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    resumed = run_train(cfg)
    assert resumed.resumed_from_step == 10
    assert losses(resumed) == pytest.approx(losses(first), rel=1e-6)
    figures["runs resumed with matching losses"] += 1


def test_evaluate_writes_its_files_before_mlflow_hears_of_them(
    project, mlflow_server_process, tmp_path, monkeypatch, figures
):
    """The tracking server dies between the evaluate stage's files and its MLflow record: the new report and
    metrics.json are in place, and the registry has no evaluation of the version (so no promotion can act on
    results the files do not show); with the server back, a re-run records it."""
    server, cfg = mlflow_server_process, project
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    env = {
        "MLFLOW_TRACKING_URI": server.url,
        "SFTOPS_PAUSE_DIR": str(pauses),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run = asdict(run_train(cfg))  # the setup, in this process; the evaluate stage below runs as DVC runs it
    proc = sftops("evaluate", wait=False, env={**env, "SFTOPS_PAUSE": "evaluate_logging"})
    wait_for(pauses / "evaluate_logging.reached", proc)
    server.stop(signal.SIGKILL)
    (pauses / "evaluate_logging.go").touch()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    metrics = json.loads(Path(cfg.paths.metrics).read_text())
    assert metrics["test_rows"] > 0 and Path(cfg.paths.reports, "report.html").is_file()
    server.start()
    client = MlflowClient(server.url)
    assert not client.search_runs([run["experiment_id"]], f"tags.`sftops.evaluation.of_run` = '{run['run_id']}'")
    run_evaluate(cfg)  # the re-run, in this process
    assert len(client.search_runs([run["experiment_id"]], f"tags.`sftops.evaluation.of_run` = '{run['run_id']}'")) == 1
    figures["faults injected"] += 1
    figures["faults survived"] += 1


def files_of(folder: str) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_a_full_disk_stops_the_stage_with_one_line_and_keeps_the_previous_output(project, figures):
    """ingest, then format, under a file size limit (the kernel's EFBIG, as a full disk gives ENOSPC): one line,
    exit code 2, and the previous data/raw or data/curated is still there, byte for byte, and usable."""
    cfg = project
    words = "the cat sat on a mat dog ran in the park what is two plus four hello how are you".split()
    big = [
        {
            "prompt": f"row {i}: " + " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(12)),
            "completion": f"answer {i}.",
        }
        for i in range(4000)
    ]  # ~400 KB of raw rows, each short enough to be kept
    Path("qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in big))
    for stage, output in (("ingest", cfg.paths.raw), ("format", cfg.paths.curated)):
        before = files_of(output)
        proc = sftops(stage, wait=False, limit_bytes=64_000)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
        line = error_lines(err)
        assert len(line) == 1 and "File too large" in line[0] and f"the previous {output} is unchanged" in line[0], err[
            -3000:
        ]
        assert files_of(output) == before
        assert not [p for p in Path(".").rglob("*.tmp") if p.is_dir()]  # no half-written output left behind
        figures["faults injected"] += 1
        figures["faults survived"] += 1
        if stage == "ingest":
            run_ingest(cfg)  # with room: the new raw rows, for format to fail on
    # The previous curated data still reads as it did (it holds the 80 rows of before, not the new 4,000).
    assert sum(len(read_split(cfg.paths.curated, split)) for split in ("train", "val", "test")) == 80


def test_a_full_disk_while_saving_the_model_keeps_the_previous_model(project, monkeypatch, figures):
    cfg = project.model_copy(update={"train": project.train.model_copy(update={"max_steps": 2})})
    first = run_train(cfg)
    monkeypatch.setenv("SFTOPS_FAULT", "disk_full:output:models")
    with pytest.raises(
        StorageError, match=r"cannot write models: No space left on device .* the previous models is unchanged"
    ):
        run_train(cfg)
    assert json.loads(Path("models/run.json").read_text())["run_id"] == first.run_id
    assert Path("models/model/adapter_model.safetensors").exists()
    figures["faults injected"] += 1
    figures["faults survived"] += 1


def test_out_of_gpu_memory_names_the_settings_to_change(project, monkeypatch, figures):
    monkeypatch.setenv("SFTOPS_FAULT", "cuda_oom:step:3")
    with pytest.raises(GpuMemoryError) as err:
        run_train(project)
    message = str(err.value)
    assert message.startswith("step 3: out of GPU memory")
    for fix in (
        "train.micro_batch_size=2 with train.grad_accum_steps=2",
        "train.gradient_checkpointing=true",
        "model.max_length",
    ):
        assert fix in message, message
    assert "the last good checkpoint is" in message and "step-000002" in message
    monkeypatch.delenv("SFTOPS_FAULT")
    run_train(project.model_copy(update={"train": project.train.model_copy(update={"max_steps": 1})}))
    monkeypatch.setenv("SFTOPS_FAULT", "cuda_oom:evaluate:tuned")
    with pytest.raises(
        GpuMemoryError, match=r"evaluating the tuned model ran out of GPU memory. Try evaluate.batch_size=8"
    ):
        run_evaluate(project)
    figures["faults injected"] += 2
    figures["faults survived"] += 2


@pytest.mark.parametrize(
    "store", ["http://127.0.0.1:{port}", "postgresql+psycopg2://sft:planted-pw-7@127.0.0.1:{port}/mlflow"]
)
def test_no_tracking_server_at_all_is_one_line_not_a_traceback(project, monkeypatch, capsys, figures, store):
    from sftops.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.format(port=free_port()))  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert main(["train"]) == TRANSIENT_EXIT
    err = capsys.readouterr().err
    line = error_lines(err)
    assert len(line) == 1 and "MLflow tracking server" in line[0] and "run again" in line[0], line
    assert "planted-pw-7" not in err and "Traceback" not in err
    figures["faults injected"] += 1
    figures["faults survived"] += 1


def test_a_failed_dvc_stage_records_nothing_and_names_the_one_command_that_restores_the_last_output(tmp_path, figures):
    """With the real dvc.yaml, `dvc repro` of a stage that fails on a bad file leaves dvc.lock as it was (no
    half-written output is ever recorded); the error line names `dvc checkout <stage>`, which puts the last
    recorded output back byte for byte from DVC's cache."""
    root, repo = Path(__file__).parents[1], tmp_path / "repo"
    shutil.copytree(root / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(root / name, repo / name)
    (repo / "data/sources").mkdir(parents=True)
    (repo / "data/sources/qa.jsonl").write_text(
        "".join(json.dumps({"prompt": f"q{i}?", "completion": f"a{i}."}) + "\n" for i in range(20))
    )
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["sources"] = [{"name": "qa", "path": "data/sources/qa.jsonl"}]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**tool_env(), "PYTHONPATH": str(repo / "src")}
    sh(sys.executable, "-m", "dvc", "init", "-q", "--no-scm", cwd=repo, env=env)
    sh(sys.executable, "-m", "dvc", "repro", "-q", "ingest", cwd=repo, env=env)
    raw = lambda: {p.relative_to(repo): p.read_bytes() for p in sorted((repo / "data/raw").rglob("*")) if p.is_file()}  # noqa: E731
    recorded, lock = raw(), (repo / "dvc.lock").read_text()
    assert recorded
    (repo / "data/sources/qa.jsonl").write_text("")  # a failed export: the stage must stop on it
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "ingest"], cwd=repo, env=env, capture_output=True, text=True
    )
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "sftops: data/sources/qa.jsonl: the file is empty" in said
    assert "`dvc checkout ingest` restores them" in said
    assert (repo / "dvc.lock").read_text() == lock
    (repo / "data/sources/qa.jsonl").write_text(
        "".join(json.dumps({"prompt": f"q{i}?", "completion": f"a{i}."}) + "\n" for i in range(20))
    )  # the source is fixed
    sh(sys.executable, "-m", "dvc", "checkout", "ingest", cwd=repo, env=env)
    assert raw() == recorded
    assert json.loads(sh(sys.executable, "-m", "dvc", "status", "--json", "ingest", cwd=repo, env=env)) == {}
    figures["faults injected"] += 1
    figures["faults survived"] += 1
