"""The cluster jobs generated from the config: a Slurm batch script that bash parses, a Kubeflow PyTorchJob
valid for the operator's CRD schema (when the CRD file is given), both running the per-node torchrun line that
the loopback stand-in runs in test_several_nodes, and no tracking password written into either."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sftops.cli import main
from sftops.config import load_config
from sftops.errors import TrainingError
from sftops.train import launch

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ["launch.nodes=4", "train.num_processes=8", "launch.gpus_per_node=8", "train.distributed=fsdp"]


def config(target: str, *more: str):
    return load_config(ROOT / "params.yaml", [f"launch.target={target}", *CLUSTER, *more])


def test_the_slurm_script_parses_and_runs_the_loopback_command_line_on_each_node(tmp_path):
    script = launch.slurm_script(config("slurm"), Path("launch/job.params.yaml"), Path("/shared/project"))
    (tmp_path / "job.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --chdir=/shared/project",
    ):
        assert line in script.splitlines()
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    per_node = shlex.split(srun)[-1]  # what bash -c runs in each task
    loopback = launch.render(
        launch.node_command(config("loopback"), Path("launch/job.params.yaml"), "$SLURM_NODEID", "$head")
    )
    assert per_node == loopback
    assert "--nnodes=4" in per_node and "--nproc-per-node=8" in per_node and "--rdzv-endpoint=$head:29500" in per_node


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="sbatch is not installed here")
def test_sbatch_accepts_the_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, job = launch.write_job(config("slurm"))
    assert subprocess.run(["sbatch", "--test-only", str(job)]).returncode == 0


def test_the_pytorchjob_has_a_master_and_workers_on_the_shared_volume(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    job = launch.pytorchjob(config("kubernetes"), Path("launch/job.params.yaml"))
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3 and job["spec"]["nprocPerNode"] == "8"
    container = specs["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["command"][-4:] == ["sftops", "train", "--params", "launch/job.params.yaml"]
    assert container["env"] == [{"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.internal:5000"}]
    assert container["volumeMounts"][0]["mountPath"] == container["workingDir"] == "/shared/sftops"


def test_a_tracking_password_goes_to_a_secret_not_into_the_manifest(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://sftops:hunter2@db:5432/mlflow")
    manifest = yaml.safe_dump(launch.pytorchjob(config("kubernetes"), Path("p.yaml")))
    assert "hunter2" not in manifest and "secretKeyRef" in manifest
    assert "hunter2" not in launch.slurm_script(config("slurm"), Path("p.yaml"), Path("/p"))


@pytest.mark.skipif(
    not os.environ.get("PYTORCHJOB_CRD"),
    reason="set PYTORCHJOB_CRD to the training operator's "
    "manifests/base/crds/kubeflow.org_pytorchjobs.yaml to validate against its schema",
)
def test_the_pytorchjob_is_valid_for_the_operators_crd_schema():
    import jsonschema

    crd = next(d for d in yaml.safe_load_all(Path(os.environ["PYTORCHJOB_CRD"]).read_text()) if d)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    for nodes in ("1", "4"):
        job = launch.pytorchjob(config("kubernetes", f"launch.nodes={nodes}"), Path("launch/job.params.yaml"))
        jsonschema.validate(job, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**job, "spec": {**job["spec"], "nprocPerNode": 8}}, schema)  # the schema does check


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="sbatch is installed: it would submit")
def test_submitting_without_the_cluster_tool_says_which_tool_and_where_the_job_file_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        TrainingError, match=r"launch.target=slurm needs `sbatch` .* the job file is launch/sftops-train.sbatch"
    ):
        launch.submit(config("slurm"))
    assert (tmp_path / "launch/sftops-train.params.yaml").exists()
    assert (
        load_config(tmp_path / "launch/sftops-train.params.yaml").launch.target == "local"
    )  # a node trains, never relaunches


def test_sftops_launch_write_only_prints_the_job(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["launch", "--params", str(ROOT / "params.yaml"), "--write-only"]
    assert main([*args, *(a for o in config_overrides("kubernetes") for a in ("--set", o))]) == 0
    out = capsys.readouterr().out
    assert "launch/sftops-train.yaml" in out and "kind: PyTorchJob" in out


def config_overrides(target: str) -> list[str]:
    return [f"launch.target={target}", *CLUSTER]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed here")
def test_kubernetes_without_a_reachable_cluster_is_one_line_naming_the_job_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-cluster"))
    with pytest.raises(
        TrainingError,
        match=r"`kubectl delete pytorchjob/sftops-train --ignore-not-found` failed \(exit 1\); "
        r"the job file is launch/sftops-train.yaml",
    ):
        launch.submit(config("kubernetes"))
