"""Two nodes for real on one machine: two torchrun agents (--nnodes 2, one process each, c10d rendezvous on
127.0.0.1, gloo), started from the per-node command lines a Slurm script runs. They train what one process
trains over the same global batch, log one MLflow run and register one model, write one set of sharded
checkpoints, resume after one node is SIGKILLed, and stop with one line when the nodes disagree."""

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from conftest import empty_mlflow_store
from sftops.config import load_config
from sftops.errors import TrainingError
from sftops.stages.train import run_train
from sftops.train import checkpoint, launch
from sftops.train.checkpoint import checkpoint_folder
from test_training_engine import losses

# The same 8 rows per step: one process of micro-batch 8, or two nodes of one process of micro-batch 4.
COMMON = {"method": "full", "group_by_length": False, "distributed": "fsdp", "grad_accum_steps": 1}
ONE = {**COMMON, "micro_batch_size": 8}
TWO_NODES = {**COMMON, "micro_batch_size": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(tmp_path: Path, write, monkeypatch, train: dict) -> Path:
    """params.yaml for a 2-node loopback job, with its own MLflow store; returns the store's file."""
    write(train)
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["launch"] = {"target": "loopback", "nodes": 2, "rdzv_port": free_port(), "name": "two-nodes"}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    store = tmp_path / "two-nodes.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_mlflow_store(store))
    return store


def test_two_nodes_train_what_one_process_trains_with_one_run_and_one_model(project, monkeypatch):
    folder, write = project
    write({**ONE, "epochs": 1})
    one = run_train(load_config("params.yaml"))
    store = two_nodes(folder, write, monkeypatch, {**TWO_NODES, "epochs": 1})
    two = run_train(load_config("params.yaml"))  # launch.target=loopback: two agents, waited for
    assert two.processes == 2
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    grad_norms = [h["grad_norm"] for h in two.history]
    assert grad_norms == pytest.approx([h["grad_norm"] for h in one.history], rel=1e-4)
    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # only rank 0 logs
    train_rows = int(runs[0].data.params["train_examples"])
    # a job of several nodes logs the launch settings that applied to it (a local run: launch.target alone)
    assert runs[0].data.params["launch.nodes"] == "2" and runs[0].data.params["launch.name"] == "two-nodes"
    assert sum(h["rows"] for h in two.history) == train_rows  # one epoch: every row once, across both nodes
    assert len(client.search_model_versions("name='tiny'")) == 1
    gap = max(abs(a - b) for a, b in zip(losses(two), losses(one)))
    print(
        f"two nodes vs one process, {len(two.history)} steps of 8 rows ({int(train_rows)} rows, one epoch): "
        f"largest loss gap {gap:.2e}, losses {[round(x, 5) for x in losses(two)]}"
    )


def agents(commands: list[str], env: dict[str, str]) -> list[subprocess.Popen]:
    """Start each node's command line (as written for launch.target=loopback) in its own process group."""
    return [
        subprocess.Popen(
            [sys.executable, *shlex.split(line)[1:]],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in commands
    ]


def kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL the node: the agent's process group and its workers (torchrun starts each in its own session)."""
    workers = psutil.Process(agent.pid).children(recursive=True)
    os.killpg(agent.pid, signal.SIGKILL)
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)


def test_a_killed_node_resumes_to_the_same_losses_after_both_are_relaunched(project, monkeypatch, tmp_path):
    folder, write = project
    train = {"max_steps": 5, "checkpoint_every": 2}
    write({**ONE, **train})
    reference = losses(run_train(load_config("params.yaml")))
    two_nodes(folder, write, monkeypatch, {**TWO_NODES, **train})
    cfg = load_config("params.yaml")
    _, job = launch.write_job(cfg)
    commands = job.read_text().splitlines()
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    env = {**os.environ, "SFTOPS_PAUSE": "after_step:3", "SFTOPS_PAUSE_DIR": str(pauses)}
    nodes = agents(commands, env)
    deadline = time.monotonic() + 300
    while not (pauses / "after_step:3.reached").exists():
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), [
            n.stderr.read()[-2000:] for n in nodes
        ]
        time.sleep(0.2)
    kill_node(nodes[1])
    (pauses / "after_step:3.go").touch()
    assert nodes[0].wait(timeout=300) != 0  # node 0 loses its peer at step 4's first collective
    jobs = list(Path("checkpoints").iterdir())
    assert jobs == [checkpoint_folder(cfg)]  # one set of checkpoints, however many nodes
    newest = checkpoint.latest(jobs[0])
    assert newest.name == "step-000002" and len(list(newest.glob("*.distcp"))) == 2
    relaunched = agents(commands, {**os.environ})
    assert [n.wait(timeout=600) for n in relaunched] == [0, 0], [n.stderr.read()[-3000:] for n in relaunched]
    report = json.loads(Path("models/run.json").read_text())
    assert report["resumed_from_step"] == 2 and report["processes"] == 2
    assert losses(report) == pytest.approx(reference, rel=1e-5)


def run_nodes(configs: list) -> list[str]:
    """Each node's agent, its own config, at once; the TrainingError each ends with."""
    errors: list[str] = ["" for _ in configs]

    def node(rank: int) -> None:
        params = launch.write_params(configs[rank], Path(f"launch/node{rank}.params.yaml"))
        try:
            launch.run_node(configs[rank], params, rank, "127.0.0.1")
        except TrainingError as exc:
            errors[rank] = str(exc)

    threads = [threading.Thread(target=node, args=(k,)) for k in range(len(configs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_nodes_that_disagree_or_do_not_come_stop_with_one_line(project, monkeypatch, tmp_path):
    folder, write = project
    two_nodes(folder, write, monkeypatch, {**TWO_NODES, "max_steps": 1})
    cfg = load_config("params.yaml")
    other_lr = load_config("params.yaml", ["train.learning_rate=0.5"])
    errors = run_nodes([cfg, other_lr])
    assert all("has params digest" in e and "rank 1 (node 1" in e and "same params.yaml" in e for e in errors), errors
    shutil.copytree(cfg.paths.curated, "other-curated")
    next(p for p in Path("other-curated").rglob("*") if p.is_file() and p.suffix != ".json").write_bytes(b"changed")
    other_data = load_config("params.yaml", [f"launch.rdzv_port={free_port()}", "paths.curated=other-curated"])
    errors = run_nodes([load_config("params.yaml", [f"launch.rdzv_port={other_data.launch.rdzv_port}"]), other_data])
    assert all("has curated data hash" in e for e in errors), errors
    alone = load_config("params.yaml", [f"launch.rdzv_port={free_port()}", "launch.join_timeout_s=5"])
    with pytest.raises(
        TrainingError,
        match=r"node 0: not all 2 nodes reached the rendezvous at 127.0.0.1:\d+ within launch.join_timeout_s=5",
    ):
        launch.run_node(alone, launch.write_params(alone, Path("launch/alone.params.yaml")), 0, "127.0.0.1")
