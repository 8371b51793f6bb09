"""The Hugging Face hub: a branch, tag or unset revision of a model or dataset repository resolved to the commit it
names now, asked of the hub when it answers and read from the local cache's refs/ when offline (HF_HUB_OFFLINE)
or unreachable, so that what a run loaded is recorded as a commit and loaded again from that commit."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from sftops.errors import SftopsError

COMMIT = re.compile(r"^[0-9a-f]{40}$")
PROBE_SECONDS = 3.0


def is_commit(revision: str | None) -> bool:
    return revision is not None and COMMIT.match(revision) is not None


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def reachable(timeout: float = PROBE_SECONDS) -> bool:
    """One TCP connection to the hub: seconds, not the minute of retries a download makes when offline."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout).close()
        return True
    except OSError:
        return False


def cached_snapshot(repo: str, revision: str | None, repo_type: str) -> Path | None:
    """The local cache's folder of `repo` at `revision` (a commit, or a branch/tag through refs/): its name is the
    commit. None when the cache does not hold it. A model's snapshot with files missing from its cached listing
    (a download of some files only) still counts: from_pretrained needs only some, and check_base looks for them;
    a dataset's does not: read offline, its folder is the dataset, and a part of it would be read as the whole."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, repo_type=repo_type, revision=revision, local_files_only=True))
    except IncompleteSnapshotError as partial:
        return Path(partial.snapshot_path) if repo_type == "model" else None
    except LocalEntryNotFoundError:
        return None


def resolve(repo: str, revision: str | None, repo_type: str, subject: str, key: str, error: type[SftopsError]) -> str:
    """The commit `revision` of `repo` names (null: the default branch), or `error` in one line naming the setting
    (`subject`: where the repository is named, `key`: the revision's setting), the repository, the revision and the
    fix. A commit already in the cache is taken as it is (commits never move); otherwise the hub is asked when it
    answers, and the cache's refs/ are read when it does not."""
    named = revision or "main"
    if is_commit(revision) and cached_snapshot(repo, revision, repo_type) is not None:
        return revision
    if not offline() and reachable():
        from_hub = _ask_hub(repo, revision, repo_type, subject, key, error)
        if from_hub is not None:
            return from_hub
    found = cached_snapshot(repo, revision, repo_type)
    if found is not None:
        return found.name
    why = "HF_HUB_OFFLINE is set" if offline() else f"{_endpoint()} cannot be reached (offline?)"
    download = f"hf download {repo}{' --repo-type dataset' if repo_type == 'dataset' else ''} --revision {named}"
    raise error(
        f"{subject} at revision {named!r} ({key}) is not in the local Hugging Face cache "
        f"({_cached_revisions(repo, repo_type)}) and {why}; download it once with network ({download}), "
        f"or fix {key} in params.yaml"
    )


def _ask_hub(
    repo: str, revision: str | None, repo_type: str, subject: str, key: str, error: type[SftopsError]
) -> str | None:
    """The hub's answer: the commit, an error for a revision or repository it does not have, None when it fails
    to answer (then the cache decides)."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    named = revision or "main"
    try:
        return HfApi().repo_info(repo, repo_type=repo_type, revision=revision, timeout=10).sha
    except RevisionNotFoundError:
        raise error(
            f"{key}={named!r}: {subject} has no such branch, tag or commit on the hub; set {key} to an "
            "existing one (null: the default branch)"
        ) from None
    except GatedRepoError:
        raise error(f"{subject} is gated on the hub; log in (hf auth login) with an account that has access") from None
    except RepositoryNotFoundError:
        raise error(
            f"{subject} is not a repository on the hub (or it is private); check the id, or log in (hf auth login)"
        ) from None
    except (
        HfHubHTTPError,
        httpx2.TransportError,
        OSError,
    ):  # the hub down, a proxy, a timeout: the cache may still have it
        return None


def _cached_revisions(repo: str, repo_type: str) -> str:
    """'cached: main, v1, 0123abcd...' or 'nothing of it cached': what a fix could point the setting at."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type=repo_type)
    refs = sorted(p.relative_to(folder / "refs").as_posix() for p in (folder / "refs").rglob("*") if p.is_file())
    commits = sorted(p.name for p in (folder / "snapshots").glob("*") if p.is_dir())
    return f"cached: {', '.join(refs + commits)}" if refs or commits else "nothing of it cached"


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT
