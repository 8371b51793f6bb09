"""`sftops reproduce <models:/NAME/VERSION | models:/NAME@ALIAS | runs:/ID | ID>`: re-run the pipeline that made
a registered model, from its reproducibility manifest, and check what came out against what was recorded.

What it does, honestly:
1. reads the run's manifest (reproduce/manifest.json) and its registered version's tags from MLflow;
2. a version the pipeline flow recorded (tags git.commit and dvc.experiment: a DVC experiment's commit, with its
   params, dvc.lock and code): checks that commit out into a fresh worktree sharing this repository's DVC cache,
   restores the curated data through DVC (`dvc checkout`, else `dvc pull` from the DVC remote) rather than
   re-ingesting sources that may have changed since, and re-runs train and evaluate with `dvc repro --force`;
3. otherwise (a run made outside the flow): checks out the manifest's commit (refusing a run made from a dirty
   tree, whose code cannot be recovered, unless allow_dirty), and runs `python -m sftops run` from the sources;
4. either way with the recorded configuration (every key, overrides included) as the worktree's params.yaml,
   that commit's own code (PYTHONPATH=<worktree>/src) and a separate MLflow store (<worktree>/mlflow.db), so
   the reproduction never touches the original registry;
5. compares: the curated data (DVC hash), the saved model's tokenizer and chat template hashes, the model's
   weight files, the params and dvc.lock hashes, the library versions; writes reproduction.json.
Data must come back identical (a failure otherwise); weights are compared and reported (bitwise equality is
expected on the same hardware and library versions, not across them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from sftops.errors import ConfigError
from sftops.jsonio import write_json
from sftops.layout import MODEL_DIR
from sftops.provenance.fingerprints import file_sha256, json_sha256
from sftops.provenance.manifest import dvc_md5, folder_hashes, library_versions, model_section


def _git(*args: str, cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"git {' '.join(args)} failed: {proc.stderr.strip()[:500]}")
    return proc.stdout.strip()


def checkout(commit: str, into: Path, repo: Path) -> None:
    """A detached worktree of the recorded commit (the repository must contain that commit)."""
    if into.exists():
        raise ConfigError(f"{into} already exists: choose another --into folder or remove it")
    try:
        _git("cat-file", "-e", f"{commit}^{{commit}}", cwd=repo)
    except ConfigError:
        raise ConfigError(f"commit {commit} is not in the repository at {repo}: fetch it first") from None
    _git("worktree", "add", "--detach", str(into.resolve()), commit, cwd=repo)


def _run(cmd: list[str], folder: Path, env: dict[str, str], log: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    log.append(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    (folder / "reproduction.log").write_text("\n".join(log), encoding="utf-8")
    if proc.returncode != 0:
        raise ConfigError(
            f"the reproduction failed at `{' '.join(cmd[2:] if cmd[1] == '-m' else cmd)}` (exit {proc.returncode}); "
            f"see {folder / 'reproduction.log'}"
        )


def _have_commit(commit: str, ref: str | None, repo: Path) -> None:
    """The recorded commit, fetched from the remotes by its ref when this clone does not have it yet."""
    try:
        _git("cat-file", "-e", f"{commit}^{{commit}}", cwd=repo)
        return
    except ConfigError:
        pass
    for remote in _git("remote", cwd=repo).split():
        if (
            ref
            and subprocess.run(["git", "fetch", "-q", remote, f"{ref}:{ref}"], cwd=repo, capture_output=True).returncode
            == 0
        ):
            return


def rerun_recorded(tags: dict[str, str], params: dict[str, Any], folder: Path, repo: Path, env: dict[str, str]) -> None:
    """Train and evaluate again on the curated data the version's DVC experiment recorded."""
    dvc = [sys.executable, "-m", "dvc"]
    log: list[str] = []
    curated = params["paths"]["curated"]
    # DVC's experiment commits also hold the top-level plots' files (the loss curves inside the model folder),
    # and DVC refuses to write an output that git tracks: untrack them in this worktree; DVC restores them.
    _git("rm", "-r", "-q", "--cached", "--ignore-unmatch", params["paths"]["model"], cwd=folder)
    _run([*dvc, "cache", "dir", "--local", str((repo / ".dvc" / "cache").resolve())], folder, env, log)
    try:
        _run([*dvc, "checkout", curated], folder, env, log)  # in this repository's cache
    except ConfigError:
        _run([*dvc, "pull", curated], folder, env, log)  # from the DVC remote
    for stage in ("train", "evaluate"):
        _run([*dvc, "repro", "--single-item", "--force", stage], folder, env, log)


def compare_outputs(manifest: dict[str, Any], folder: Path) -> dict[str, dict[str, Any]]:
    """Recorded vs reproduced, one check per item: {"recorded", "reproduced", "match"}."""
    params = manifest["params"]
    curated = folder / params["paths"]["curated"]
    model_dir = folder / params["paths"]["model"] / MODEL_DIR
    reproduced_model = model_section(model_dir)
    recorded_model = manifest.get("model", {})
    lock = folder / "dvc.lock"

    def check(recorded: Any, reproduced: Any) -> dict[str, Any]:
        return {"recorded": recorded, "reproduced": reproduced, "match": recorded == reproduced}

    return {
        "params_sha256": check(
            manifest["params_sha256"], json_sha256(yaml.safe_load((folder / "params.yaml").read_text()))
        ),
        "dvc_lock_sha256": check(manifest.get("dvc_lock_sha256"), file_sha256(lock) if lock.exists() else None),
        "curated_dvc_md5": check(manifest["data"]["curated_dvc_md5"], dvc_md5(curated)),
        "curated_files": check(manifest["data"]["files"], folder_hashes(curated)),
        "tokenizer_sha256": check(recorded_model.get("tokenizer_sha256"), reproduced_model["tokenizer_sha256"]),
        "chat_template_sha256": check(
            recorded_model.get("chat_template_sha256"), reproduced_model["chat_template_sha256"]
        ),
        "model_files": check(recorded_model.get("files"), reproduced_model["files"]),
        "libraries": check(manifest.get("libraries"), library_versions()),
    }


# A reproduction fails when these differ; the others are reported.
REQUIRED = ("params_sha256", "curated_dvc_md5", "tokenizer_sha256", "chat_template_sha256")


def reproduce(
    manifest: dict[str, Any],
    run_id: str,
    into: Path | None = None,
    repo: Path = Path("."),
    allow_dirty: bool = False,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    tags = tags or {}
    recorded = "dvc.experiment" in tags and "git.commit" in tags
    commit, dirty = (tags["git.commit"], False) if recorded else (manifest["git"]["commit"], manifest["git"]["dirty"])
    if commit is None:
        raise ConfigError(f"run {run_id} was not made in a git repository: its code cannot be checked out")
    if dirty and not allow_dirty:
        raise ConfigError(
            f"run {run_id} was made from uncommitted changes on top of {commit[:12]}: that code is lost, so the run "
            "cannot be reproduced exactly (pass --allow-dirty to re-run the commit anyway)"
        )
    folder = Path(into) if into is not None else Path("reproductions") / run_id[:12]
    if recorded:
        _have_commit(commit, tags.get("git.ref"), repo)
    checkout(commit, folder, repo)
    (folder / "params.yaml").write_text(yaml.safe_dump(manifest["params"], sort_keys=False), encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str((folder / "src").resolve()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{(folder / 'mlflow.db').resolve()}"
    env.pop("DVC_ROOT", None)
    if recorded:
        rerun_recorded(tags, manifest["params"], folder, repo, env)
    else:
        _run([sys.executable, "-m", "sftops", "run", "--params", "params.yaml"], folder, env, [])
    checks = compare_outputs(manifest, folder)
    failed = [name for name in REQUIRED if not checks[name]["match"]]
    result = {
        "run_id": run_id,
        "commit": commit,
        "folder": str(folder),
        "data_restored_by_dvc": recorded,
        "checks": checks,
        "failed": failed,
        "reproduced": not failed,
    }
    write_json(folder / "reproduction.json", result)
    return result
