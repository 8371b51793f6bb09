"""DVC, as the Prefect flow drives it: run a stage or an experiment and say what DVC did, record the workspace as
an experiment, push it, and read what a revision recorded. Plain functions over the `dvc` and `git` commands;
the flow (sft_pipeline.py) adds Prefect around them. (Named dvc_steps, not dvc: a flows/dvc.py would shadow the
dvc package for scripts run from this folder.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from sftops.errors import TRANSIENT_EXIT  # the exit code of an outage: the stage may succeed on another try

# What DVC prints for each way a stage can end well (dvc/stage/run.py, dvc/repo/reproduce.py, DVC 3.67).
RAN, RESTORED, UP_TO_DATE = "Ran", "Restored", "Up to date"
_OUTCOMES = (
    (re.compile(r"Running stage '([^']+)'"), RAN),
    (re.compile(r"Stage '([^']+)' is cached - skipping run, checking out outputs"), RESTORED),
    (re.compile(r"Stage '([^']+)' didn't change, skipping"), UP_TO_DATE),
)
_EXITED = re.compile(r"failed to run: .*, exited with (-?\d+)")


class DvcFailed(RuntimeError):
    """A DVC command failed. `stage_exit` is the stage command's exit code when a stage failed (None when DVC
    itself did); `transient` says whether the same command may succeed on another try."""

    def __init__(self, message: str, stage_exit: int | None, transient: bool) -> None:
        super().__init__(message)
        self.stage_exit, self.transient = stage_exit, transient


def dvc_command() -> list[str]:
    return [sys.executable, "-m", "dvc"]


def stage_path() -> str:
    """PATH with this interpreter's scripts folder first: the stage commands (`sftops train`) are the ones installed
    beside the Python running the flow, also when it is run as `.venv/bin/python flows/sft_pipeline.py` without the
    environment activated. (The folder of sys.executable as invoked, not resolved: a venv's python is a link.)"""
    scripts = str(Path(sys.executable).parent)
    rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != scripts]
    return os.pathsep.join([scripts, *rest])


def run_dvc(args: list[str], cwd: Path, log: Callable[[str], None]) -> list[str]:
    """Run `dvc <args>`, passing each line of its output (and of the stage commands it runs) to `log` as it comes;
    returns the lines, or raises DvcFailed naming what failed and how to recover."""
    # Progress bars redraw with \r many times a second: one line every 30 s is enough in a log.
    env = {**os.environ, "TQDM_MININTERVAL": "30", "DVC_NO_ANALYTICS": "1", "PATH": stage_path()}
    proc = subprocess.Popen(
        [*dvc_command(), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines = []
    for raw in proc.stdout:
        for line in raw.replace("\r", "\n").splitlines():
            if line.strip():
                lines.append(line)
                log(line)
    if proc.wait() != 0:
        raise failure(args, lines, proc.returncode)
    return lines


def failure(args: list[str], lines: list[str], returncode: int) -> DvcFailed:
    said = "\n".join(lines)
    exited = _EXITED.search(said)
    stage_exit = int(exited.group(1)) if exited else None
    errors = [ln for ln in lines if ln.startswith(("sftops:", "ERROR:"))]
    summary = "; ".join(errors[-2:]) or (lines[-1] if lines else f"exit {returncode}")
    if stage_exit is None:
        # DVC's own failure: another DVC process holding the repository's lock is worth waiting for.
        transient = "Unable to acquire lock" in said
    else:
        transient = stage_exit == TRANSIENT_EXIT or stage_exit < 0 or stage_exit > 128  # an outage; a killed process
    return DvcFailed(f"dvc {' '.join(args)} failed: {summary}", stage_exit, transient)


def outcomes(lines: list[str]) -> dict[str, str]:
    """stage name -> Ran | Restored | Up to date, from what DVC printed."""
    found: dict[str, str] = {}
    for line in lines:
        for pattern, outcome in _OUTCOMES:
            match = pattern.search(line)
            if match:
                found[match.group(1)] = outcome
    return found


def repro(stage: str, cwd: Path, log: Callable[[str], None]) -> str:
    """`dvc repro --single-item <stage>`: DVC decides whether to run, restore or skip the stage; returns which."""
    try:
        lines = run_dvc(["repro", "--single-item", stage], cwd, log)
    except DvcFailed as exc:
        if exc.stage_exit is not None:
            exc.args = (
                f"{exc.args[0]}. Nothing was recorded for stage {stage!r}; `dvc checkout {stage}` restores "
                "its last recorded outputs",
            )
        raise
    outcome = outcomes(lines).get(stage)
    if outcome is None:
        raise RuntimeError(
            f"dvc repro {stage}: could not tell from DVC's output whether it ran, restored or skipped "
            f"the stage (DVC's messages changed?):\n" + "\n".join(lines[-20:])
        )
    return outcome


def exp_run(name: str, overrides: list[str], cwd: Path, log: Callable[[str], None]) -> dict[str, str]:
    """`dvc exp run --temp -n <name> -S key=value ...`: the pipeline on those params, in a temporary copy of the
    repository (so several run at once), recorded as experiment <name>; returns each stage's outcome."""
    args = ["exp", "run", "--temp", "-n", name]
    for assignment in overrides:
        args += ["-S", assignment]
    lines = run_dvc(args, cwd, log)
    if exp_ref(name, cwd) is None:
        raise RuntimeError(f"dvc exp run finished but recorded no experiment {name!r} (a shallow git clone?)")
    return outcomes(lines)


def exp_save(name: str, include: list[str], cwd: Path, log: Callable[[str], None]) -> None:
    """Record the workspace (params, dvc.lock, the metrics file, the code) as experiment <name>: a git commit on
    refs/exps/..., whose outputs DVC has already cached."""
    args = ["exp", "save", "-n", name]
    for path in include:
        args += ["-I", path]
    run_dvc(args, cwd, log)


def exp_ref(name: str, cwd: Path) -> str | None:
    """The git ref of experiment <name> (refs/exps/<baseline>/<name>), if there is one."""
    refs = git(["for-each-ref", "--format=%(refname)", "refs/exps"], cwd).splitlines()
    return next((r for r in refs if r.rsplit("/", 1)[-1] == name), None)


def git(args: list[str], cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise DvcFailed(f"git {' '.join(args)} failed: {done.stderr.strip()[:300]}", None, False)
    return done.stdout.strip()


def experiment_with_lock(cwd: Path) -> str | None:
    """The newest experiment whose commit holds the workspace's dvc.lock byte for byte (the same stages, deps,
    params and outputs, the metrics file's hash included): a run in which DVC found nothing new is recorded there
    already. Its ref, or None."""
    if not (cwd / "dvc.lock").is_file():
        return None
    blob = git(["hash-object", "dvc.lock"], cwd)
    listed = git(["for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps"], cwd).split()
    # refs/exps/<2 hex>/<38 hex>/<name>; DVC's own working refs (refs/exps/exec/..., celery stash) are not runs
    refs = [r for r in listed if len(parts := r.split("/")) == 5 and len(parts[2]) == 2 and len(parts[3]) == 38]
    if not refs:
        return None
    done = subprocess.run(
        ["git", "cat-file", "--batch-check"],
        cwd=cwd,
        input="".join(f"{ref}:dvc.lock\n" for ref in refs),
        capture_output=True,
        text=True,
    )
    found = [line.split()[0] for line in done.stdout.splitlines()]
    return next((ref for ref, object_id in zip(refs, found) if object_id == blob), None)


def git_remote_url(remote: str, cwd: Path) -> str | None:
    """The URL of git remote `remote`, None when the repository has no such remote."""
    done = subprocess.run(["git", "remote", "get-url", remote], cwd=cwd, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def dvc_remote(cwd: Path) -> str | None:
    """The default DVC remote's name, if one is configured."""
    done = subprocess.run([*dvc_command(), "remote", "default"], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def committed_dvc_remote(rev: str, cwd: Path) -> str | None:
    """The default DVC remote that revision `rev`'s .dvc/config names: the one a clone of it pulls from (a remote
    set in .dvc/config.local or the user's config stays on this machine)."""
    import configparser

    parser = configparser.ConfigParser()
    try:
        parser.read_string(git(["show", f"{rev}:.dvc/config"], cwd))
    except (DvcFailed, configparser.Error):
        return None
    return parser.get("core", "remote", fallback=None)


def exp_push(name: str, remote: str, cwd: Path, log: Callable[[str], None]) -> None:
    """Push experiment <name>'s git ref to `remote`, and its outputs to the default DVC remote."""
    run_dvc(["exp", "push", remote, name], cwd, log)


def show(rev: str, path: str, cwd: Path) -> str:
    """A git-tracked file (params.yaml, dvc.lock, metrics.json) as revision `rev` recorded it."""
    return git(["show", f"{rev}:{path}"], cwd)


def read_output(path: str, rev: str, cwd: Path) -> str:
    """A file inside a DVC-tracked output, as revision `rev` recorded it (from DVC's cache)."""
    import dvc.api

    return dvc.api.read(path, repo=str(cwd), rev=rev)


def locked_outputs(lock_text: str) -> dict[str, dict[str, Any]]:
    """dvc.lock's outputs: path -> {stage, md5}."""
    lock = yaml.safe_load(lock_text) or {}
    return {
        out["path"]: {"stage": stage, "md5": out.get("md5")}
        for stage, entry in lock.get("stages", {}).items()
        for out in entry.get("outs", [])
    }
