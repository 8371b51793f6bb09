"""A DVC remote (a local folder here; S3 or GCS for a team, see README "Operations") holds every data version:
pushed from one clone, pulled into a fresh clone, each committed version comes back byte for byte."""

from __future__ import annotations

import sys
from pathlib import Path

from realstack import git_commit, make_repo, sh, tool_env


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_then_pull_on_a_fresh_clone_restores_each_data_version_exactly(tmp_path, stories_model, gsm8k):
    repo = make_repo(tmp_path / "repo", stories_model, gsm8k, rows=30)
    env = tool_env()

    def dvc(*args: str, cwd: Path = repo) -> str:
        return sh(sys.executable, "-m", "dvc", *args, cwd=cwd, env=env)

    dvc("remote", "add", "--default", "storage", str(tmp_path / "remote"))
    source = repo / "data/sources/gsm8k.jsonl"
    lines = (gsm8k / "train.jsonl").read_text().splitlines()
    versions: dict[str, dict[str, bytes]] = {}
    for rows in (30, 45):  # two data versions, each committed and pushed
        source.write_text("\n".join(lines[:rows]) + "\n")
        dvc("repro", "ingest")
        sh("git", "add", "-A", cwd=repo)
        git_commit(repo, f"{rows} rows")
        dvc("push")
        commit = sh("git", "rev-parse", "HEAD", cwd=repo).strip()
        versions[commit] = files(repo / "data/raw")
    assert len({str(v) for v in versions.values()}) == 2  # the versions differ
    assert dvc("status", "--cloud").strip().endswith("Cache and remote 'storage' are in sync.")

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    assert not (clone / "data/raw").exists() and not (clone / ".dvc/cache").exists()
    for commit, expected in versions.items():
        sh("git", "checkout", "-q", commit, cwd=clone)
        dvc("pull", "ingest", cwd=clone)
        assert files(clone / "data/raw") == expected
