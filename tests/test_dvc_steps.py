"""What the flow reads from DVC, against real DVC in a temporary git + DVC repo with a one-line stage: each way a
stage ends well (ran, restored from the run-cache, up to date), and each way it fails (a user mistake, an outage,
a crash), which decides whether the flow retries."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from realstack import git_commit, sh, tool_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flows"))
import dvc_steps  # noqa: E402

STAGE = (
    "python -c \"import sys, yaml; p = yaml.safe_load(open('params.yaml')); open('out.txt', 'w').write(str(p['a'])); "
    "sys.exit(p['exit'])\""
)


@pytest.fixture
def repo(tmp_path) -> Path:
    sh("git", "init", "-q", cwd=tmp_path)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=tmp_path, env=tool_env())
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"s": {"cmd": STAGE, "params": ["a", "exit"], "outs": ["out.txt"]}}})
    )
    set_params(tmp_path, a=1)
    sh("git", "add", "-A", cwd=tmp_path)
    git_commit(tmp_path, "stage")
    return tmp_path


def set_params(repo: Path, a: int, exit: int = 0) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump({"a": a, "exit": exit}))


def test_dvc_says_ran_then_up_to_date_then_restored_from_its_run_cache(repo):
    lines: list[str] = []
    assert dvc_steps.repro("s", repo, lines.append) == dvc_steps.RAN
    assert dvc_steps.repro("s", repo, lines.append) == dvc_steps.UP_TO_DATE
    set_params(repo, a=2)
    assert dvc_steps.repro("s", repo, lines.append) == dvc_steps.RAN
    set_params(repo, a=1)  # back to the first params: DVC checks the first output out instead of running
    assert dvc_steps.repro("s", repo, lines.append) == dvc_steps.RESTORED
    assert (repo / "out.txt").read_text() == "1"
    assert any("Running stage 's'" in line for line in lines)  # DVC's own lines reach the log


@pytest.mark.parametrize(("code", "transient"), [(2, False), (75, True), (1, False)])
def test_a_failed_stage_is_retried_only_when_it_was_an_outage(repo, code, transient):
    set_params(repo, a=3, exit=code)
    with pytest.raises(dvc_steps.DvcFailed) as failed:
        dvc_steps.repro("s", repo, lambda line: None)
    assert failed.value.stage_exit == code and failed.value.transient is transient
    assert "`dvc checkout s` restores its last recorded outputs" in str(failed.value)
    assert not (repo / "dvc.lock").exists()  # nothing recorded


def test_an_experiment_is_recorded_with_its_params_and_the_outcome_of_each_stage(repo):
    dvc_steps.repro("s", repo, lambda line: None)
    outcomes = dvc_steps.exp_run("two", ["a=2"], repo, lambda line: None)
    assert outcomes == {"s": dvc_steps.RAN}
    ref = dvc_steps.exp_ref("two", repo)
    assert ref.startswith("refs/exps/") and yaml.safe_load(dvc_steps.show(ref, "params.yaml", repo))["a"] == 2
    assert dvc_steps.locked_outputs(dvc_steps.show(ref, "dvc.lock", repo))["out.txt"]["stage"] == "s"
    assert yaml.safe_load((repo / "params.yaml").read_text())["a"] == 1  # the workspace is untouched


def test_the_stage_commands_are_found_beside_the_flows_python_without_the_environment_activated(repo, monkeypatch):
    """`.venv/bin/python flows/sft_pipeline.py` with PATH not naming .venv/bin: `sftops <stage>` still runs."""
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"s": {"cmd": "sftops --help > out.txt", "outs": ["out.txt"]}}})
    )
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # git, and no sftops
    assert dvc_steps.repro("s", repo, lambda line: None) == dvc_steps.RAN
    assert "usage: sftops" in (repo / "out.txt").read_text()
