"""A Hugging Face hub cache folder built by hand, in the layout huggingface_hub reads offline:

    <cache>/models--org--name/blobs/<sha256>            file contents
    <cache>/models--org--name/snapshots/<commit>/<path>  links to ../../blobs/<sha256>
    <cache>/models--org--name/refs/<branch or tag>       the commit it names
    (datasets--org--name/... for a dataset)

so tests load fake `org/name` repositories at several revisions with HF_HUB_OFFLINE=1 and no network."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens


def _contents(files: Path | dict[str, bytes]) -> dict[str, bytes]:
    if isinstance(files, dict):
        return files
    return {p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}


def add_revision(
    cache: Path, repo_id: str, files: Path | dict[str, bytes], refs: tuple[str, ...] = (), repo_type: str = "model"
) -> str:
    """One commit of `repo_id` holding `files` (a folder's files, or path -> bytes), with each ref (branch or tag)
    pointing at it; returns the commit (a sha1 of the repository and its files, so equal content, equal commit)."""
    contents = _contents(files)
    repo = Path(cache) / "--".join([f"{repo_type}s", *repo_id.split("/")])
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    commit = hashlib.sha1(repr((repo_id, sorted(digests.items()))).encode()).hexdigest()
    for name, data in contents.items():
        blob = repo / "blobs" / digests[name]
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # huggingface_hub writes it without a newline
    return commit


def offline_env(cache: Path, scratch: Path) -> dict[str, str]:
    """Environment variables for a process that must read `cache` only: offline, an unreachable endpoint as well
    (nothing may slip out), and the other Hugging Face caches (datasets' Arrow files, tokens) in `scratch`."""
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(scratch / "hf-home"),
        "HF_DATASETS_CACHE": str(scratch / "datasets-cache"),
        "HF_ENDPOINT": UNREACHABLE,
    }
