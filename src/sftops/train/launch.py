"""Running the train stage on several nodes: one torchrun agent per node, started by the cluster a team already
has (a Slurm batch script, a Kubeflow PyTorchJob) or, as a stand-in, by this process on loopback.

Every form runs the same command line per node (`node_command`): torchrun with c10d rendezvous on the head
node (Slurm, loopback) or the operator's static rendezvous (Kubernetes, which sets PET_MASTER_ADDR,
PET_NODE_RANK), then `sftops train` with the resolved params. The project folder (params, curated data,
checkpoints, models/) must be on a filesystem every node mounts at the same path."""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from sftops.config import Config
from sftops.errors import TrainingError

SAFE = re.compile(r"^[\w@%+=:,./${}()-]+$")  # left unquoted, so that $SLURM_NODEID and $(PET_...) expand


def render(cmd: list[str]) -> str:
    return " ".join(arg if SAFE.match(arg) else shlex.quote(arg) for arg in cmd)


def job_files(cfg: Config) -> tuple[Path, Path]:
    """Where the resolved params and the job file (script or manifest) are written, in the project folder."""
    folder = Path("launch")
    suffix = {"slurm": ".sbatch", "kubernetes": ".yaml"}.get(cfg.launch.target, ".txt")
    return folder / f"{cfg.launch.name}.params.yaml", folder / f"{cfg.launch.name}{suffix}"


def write_params(cfg: Config, path: Path) -> Path:
    """The resolved config (overrides applied) that every node reads; `launch.target: local` inside, so that a
    node runs its share of the job instead of launching another."""
    path.parent.mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_dump(mode="json")
    resolved["launch"]["target"] = "local"
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    return path


def node_command(cfg: Config, params: Path, node_rank: str | None = None, head: str | None = None) -> list[str]:
    """The command one node runs: a torchrun agent for train.num_processes processes of a job of launch.nodes
    nodes. Without node_rank and head, torchrun reads them from PET_NODE_RANK, PET_MASTER_ADDR/PORT."""
    launch = cfg.launch
    cmd = [
        "python",
        "-m",
        "torch.distributed.run",
        f"--nnodes={launch.nodes}",
        f"--nproc-per-node={cfg.train.num_processes}",
        "--max-restarts=0",
    ]
    if head is not None:
        cmd += [
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={head}:{launch.rdzv_port}",
            f"--rdzv-id={launch.name}",
            f"--rdzv-conf=join_timeout={launch.join_timeout_s}",
        ]
    return [*cmd, "-m", "sftops", "train", "--params", str(params)]


def slurm_script(cfg: Config, params: Path, project: Path) -> str:
    """An sbatch script: one task per node, each running node_command with Slurm's node id; the first node of
    the allocation is the rendezvous host. The environment (MLFLOW_TRACKING_URI and its credentials) is the
    submitter's (--export=ALL), so no secret is written into the script."""
    launch = cfg.launch
    gpus = [f"#SBATCH --gpus-per-node={launch.gpus_per_node}"] if launch.gpus_per_node else []
    command = node_command(cfg, params, "$SLURM_NODEID", "$head")
    return "\n".join(
        [
            "#!/bin/bash",
            f"#SBATCH --job-name={launch.name}",
            f"#SBATCH --nodes={launch.nodes}",
            "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --cpus-per-task={launch.cpus_per_node}",
            *gpus,
            f"#SBATCH --time={launch.time_limit_minutes}",
            f"#SBATCH --chdir={project}",
            "#SBATCH --export=ALL",
            f"#SBATCH --output={project / 'launch' / launch.name}-%j.log",
            "set -euo pipefail",
            'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            "export head",
            # single quotes: each task expands its own $SLURM_NODEID
            f"srun --kill-on-bad-exit=1 bash -c '{render(command)}'",
            "",
        ]
    )


def tracking_env() -> list[dict[str, Any]]:
    """MLFLOW_TRACKING_URI from this environment; one with credentials comes from a Secret, never the manifest."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return []
    if urlsplit(uri).password or "password=" in uri:
        return [
            {"name": "MLFLOW_TRACKING_URI", "valueFrom": {"secretKeyRef": {"name": "sftops-tracking", "key": "uri"}}}
        ]
    return [{"name": "MLFLOW_TRACKING_URI", "value": uri}]


def pytorchjob(cfg: Config, params: Path) -> dict[str, Any]:
    """A Kubeflow training-operator PyTorchJob (kubeflow.org/v1): a Master and launch.nodes - 1 Workers, each a pod
    running node_command on the shared volume; the operator sets the rendezvous variables torchrun reads."""
    launch = cfg.launch
    resources = {"limits": {"nvidia.com/gpu": launch.gpus_per_node}} if launch.gpus_per_node else {}
    container = {
        "name": "pytorch",  # the operator finds the training container by this name
        "image": launch.image,
        "command": node_command(cfg, params),
        "workingDir": launch.shared_folder,
        "env": tracking_env(),
        "volumeMounts": [{"name": "shared", "mountPath": launch.shared_folder}],
        **({"resources": resources} if resources else {}),
    }
    pod = {
        "spec": {
            "containers": [container],
            "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": launch.volume_claim}}],
        }
    }
    replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": pod}}
    if launch.nodes > 1:
        replicas["Worker"] = {"replicas": launch.nodes - 1, "restartPolicy": "Never", "template": copy.deepcopy(pod)}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": launch.name},
        "spec": {
            "nprocPerNode": str(cfg.train.num_processes),
            "runPolicy": {"backoffLimit": 0},
            "pytorchReplicaSpecs": replicas,
        },
    }


def write_job(cfg: Config) -> tuple[Path, Path]:
    """Write the resolved params and the job file for launch.target; return both paths."""
    params, job = job_files(cfg)
    write_params(cfg, params)
    if cfg.launch.target == "slurm":
        job.write_text(slurm_script(cfg, params, Path.cwd()))
    elif cfg.launch.target == "kubernetes":
        job.write_text(yaml.safe_dump(pytorchjob(cfg, params), sort_keys=False))
    else:
        job.write_text(
            "\n".join(render(node_command(cfg, params, str(k), "127.0.0.1")) for k in range(cfg.launch.nodes)) + "\n"
        )
    return params, job


def submit(cfg: Config) -> None:
    """Hand the job to launch.target and wait until it ends; a failed job is a TrainingError naming its log."""
    params, job = write_job(cfg)
    if cfg.launch.target == "loopback":
        run_loopback(cfg, params)
        return
    if cfg.launch.target == "slurm":  # --wait: sbatch returns when the job ends, with its exit status
        run_tool(cfg, ["sbatch", "--wait", str(job)], job)
        return
    name = f"pytorchjob/{cfg.launch.name}"
    run_tool(cfg, ["kubectl", "delete", name, "--ignore-not-found"], job)  # a finished job of that name would not rerun
    run_tool(cfg, ["kubectl", "apply", "-f", str(job)], job)
    wait_for_pytorchjob(cfg, name, job)


def run_tool(cfg: Config, cmd: list[str], job: Path, capture: bool = False) -> str:
    try:
        done = subprocess.run(cmd, capture_output=capture, text=True)
    except FileNotFoundError:
        raise TrainingError(
            f"launch.target={cfg.launch.target} needs `{cmd[0]}` on this machine's PATH; "
            f"the job file is {job} (submit it by hand, or set launch.target=local)"
        ) from None
    if done.returncode != 0:
        raise TrainingError(f"`{render(cmd)}` failed (exit {done.returncode}); the job file is {job}")
    return done.stdout or ""


def wait_for_pytorchjob(cfg: Config, name: str, job: Path) -> None:
    """Poll the job's last condition until Succeeded or Failed (`kubectl wait` for Succeeded alone would wait out
    its timeout on a failed job)."""
    deadline = time.monotonic() + cfg.launch.wait_timeout_s
    while time.monotonic() < deadline:
        state = run_tool(
            cfg, ["kubectl", "get", name, "-o", "jsonpath={.status.conditions[-1:].type}"], job, capture=True
        )
        if state.strip() == "Succeeded":
            return
        if state.strip() == "Failed":
            raise TrainingError(
                f"{name} failed; its logs: kubectl logs -l training.kubeflow.org/job-name={cfg.launch.name}"
            )
        time.sleep(30)
    raise TrainingError(
        f"{name} did not finish within launch.wait_timeout_s={cfg.launch.wait_timeout_s}; it is still "
        f"running: kubectl get {name}"
    )


def run_node(cfg: Config, params: Path, node_rank: int, head: str, env: dict[str, str] | None = None) -> None:
    """Run one node's torchrun agent here (what each Slurm task does); its output passes through. A worker's
    one-line `sftops:` error, or a rendezvous that did not complete in time, becomes this node's TrainingError."""
    cmd = [sys.executable, *node_command(cfg, params, str(node_rank), head)[1:]]
    agent = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    errors, timed_out = [], False
    for line in agent.stderr:
        sys.stderr.write(line)
        errors += [line.strip()] if line.startswith("sftops:") else []
        timed_out = timed_out or "RendezvousTimeoutError" in line
    if agent.wait() == 0:
        return
    if errors:
        raise TrainingError(f"node {node_rank}: {errors[0].removeprefix('sftops:').strip()}")
    if timed_out:
        raise TrainingError(
            f"node {node_rank}: not all {cfg.launch.nodes} nodes reached the rendezvous at {head}:"
            f"{cfg.launch.rdzv_port} within launch.join_timeout_s={cfg.launch.join_timeout_s}; start every "
            f"node within that time (or raise it) and check that each can reach the head node"
        )
    raise TrainingError(f"node {node_rank}: torchrun failed (exit {agent.returncode}); see the log above")


def run_loopback(cfg: Config, params: Path) -> None:
    """The local stand-in for a cluster: launch.nodes agents on this machine, rendezvous on 127.0.0.1."""
    failures: list[TrainingError] = []

    def node(rank: int) -> None:
        try:
            run_node(cfg, params, rank, "127.0.0.1")
        except TrainingError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=node, args=(k,)) for k in range(cfg.launch.nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
