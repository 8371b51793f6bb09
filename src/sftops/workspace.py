"""The project folder: where the default MLflow store and caches live, the same for every stage of one run.

A stage runs in the project folder, except inside a DVC experiment (`dvc exp run --temp` or `--queue`), which runs
it in a temporary copy of the repository that is deleted afterwards: a store or cache there would be thrown away
with it. DVC tells every stage command the project it belongs to in $DVC_ROOT; outside DVC it is the working
folder."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


DEFAULT_CACHE_DIR = ".sftops-cache"


def cache_root() -> Path:
    """$SFTOPS_CACHE_DIR, else .sftops-cache/ in the project folder (shared by the runs of DVC experiments): caches
    that are never a stage's output (the base model's evaluations, recorded file digests, tokenizers read out of
    GGUF files); deleting it is safe."""
    return Path(os.environ.get("SFTOPS_CACHE_DIR") or project_root() / DEFAULT_CACHE_DIR)
