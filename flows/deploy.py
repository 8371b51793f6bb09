"""`prefect deploy` for the deployments in prefect.yaml, with the code pinned and a Prefect 3.8.8 client bug
worked around.

    python flows/deploy.py --all                # = prefect deploy --all (any `prefect deploy` options work)

Pinning: prefect.yaml's pull step checks out $SFTOPS_COMMIT from $SFTOPS_REPO into $SFTOPS_DEPLOY_DIR/sftops.
Unset, they default to this checkout's HEAD, its `origin` remote (else this folder itself) and
~/sftops-deployments. A commit the repository does not have, or uncommitted changes, would make the deployed
code differ from what you see here: both are refused with one line saying what to do.

The client bug: after creating a deployment, `prefect deploy` asks the server which workers are online and sends
`"limit": null, "offset": null`; the server (on FastAPI 0.154, the newest that Prefect 3.8.8's server runs on)
answers 422, so the command fails after the first deployment. This sends numbers instead (it only asks whether
any worker is online) and runs Prefect's unchanged `deploy` command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect.cli import app
from prefect.client.orchestration._work_pools.client import WorkPoolAsyncClient

_read_workers = WorkPoolAsyncClient.read_workers_for_work_pool


async def _read_workers_with_limits(self, work_pool_name, worker_filter=None, offset=None, limit=None):
    return await _read_workers(self, work_pool_name, worker_filter, offset=offset or 0, limit=limit or 1)


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def pin() -> str | None:
    """Fill SFTOPS_REPO, SFTOPS_COMMIT and SFTOPS_DEPLOY_DIR; the reason to refuse, if any."""
    head = _git("rev-parse", "HEAD")
    if head.returncode != 0:
        return "not a git repository with a commit: a deployment runs a pinned commit (git init, git add, git commit)"
    if _git("status", "--porcelain", "--untracked-files=no").stdout.strip():
        return "uncommitted changes: the deployment would run HEAD without them; commit (and push) them first"
    origin = _git("remote", "get-url", "origin")
    repo = origin.stdout.strip() if origin.returncode == 0 else str(Path.cwd().resolve())
    os.environ.setdefault("SFTOPS_REPO", repo)
    os.environ.setdefault("SFTOPS_COMMIT", head.stdout.strip())
    if origin.returncode == 0 and not _git("branch", "-r", "--contains", os.environ["SFTOPS_COMMIT"]).stdout.strip():
        return f"commit {os.environ['SFTOPS_COMMIT'][:12]} is not on remote 'origin' ({repo}): git push first"
    folder = Path(os.environ.setdefault("SFTOPS_DEPLOY_DIR", str(Path.home() / "sftops-deployments")))
    folder.mkdir(parents=True, exist_ok=True)  # the process worker's working_dir
    print(
        f"deploying commit {os.environ['SFTOPS_COMMIT'][:12]} of {os.environ['SFTOPS_REPO']}, runs in {folder}/sftops"
    )
    return None


if __name__ == "__main__":
    refused = pin()
    if refused:
        print(f"deploy: {refused}", file=sys.stderr)
        sys.exit(2)
    WorkPoolAsyncClient.read_workers_for_work_pool = _read_workers_with_limits
    sys.argv = ["prefect", "deploy", *sys.argv[1:]]
    app()
