"""The reproducibility manifest of a pipeline run: the code (git commit), the exact configuration, the data
(DVC's hash of data/curated, per-file hashes), the seeds, the hardware and library versions, and, once the
model is saved, the hashes of its files, tokenizer and chat template. `sftops reproduce` re-runs from it."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sftops.config import Config
from sftops.provenance.fingerprints import chat_template_sha256, file_md5, file_sha256, json_sha256, tokenizer_sha256
from sftops.redact import redact

LIBRARIES = (
    "sftops",
    "torch",
    "transformers",
    "peft",
    "tokenizers",
    "accelerate",
    "datasets",
    "mlflow",
    "dvc",
    "prefect",
    "numpy",
)


def git_state(cwd: str | Path | None = None) -> tuple[str | None, bool]:
    """(HEAD commit, whether tracked files differ from it); (None, False) outside a git repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=cwd)
    except (OSError, subprocess.CalledProcessError):
        return None, False
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=cwd
    )
    return out.stdout.strip(), bool(dirty.stdout.strip())


def git_commit() -> str | None:
    commit, dirty = git_state()
    return None if commit is None else commit + ("-dirty" if dirty else "")


def dvc_md5(path: Path, skip: tuple[str, ...] = ()) -> str:
    """The hash DVC records for a directory output (in dvc.lock), computed here so that runs made outside
    `dvc repro` (the Prefect flow, `sftops run`) carry the same data version: md5 of the sorted
    [{"md5", "relpath"}] listing of the folder's files, plus '.dir'. Files under a folder named in `skip`
    (e.g. __pycache__) are left out."""
    entries = [
        {"md5": file_md5(f), "relpath": f.relative_to(path).as_posix()}
        for f in sorted(
            p for p in Path(path).rglob("*") if p.is_file() and not set(p.relative_to(path).parts) & set(skip)
        )
    ]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def params_sha256(cfg: Config) -> str:
    return json_sha256(cfg.model_dump(mode="json"))


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in LIBRARIES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info.update(
            device="cuda",
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            cuda=torch.version.cuda,
        )
    else:
        info["device"] = "cpu"
    return info


def folder_hashes(folder: Path) -> dict[str, str]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def resolved_revisions(cfg: Config, base_revision: str | None) -> dict[str, Any]:
    """What the run's hub model and datasets were at: model.revision as configured and as resolved when the run
    started (a hub commit, a pkg: package's version, None for a local folder), and each hub source's commit as the
    ingest stage recorded it (in its report, which format carries into the curated folder)."""
    from sftops.layout import INGEST_REPORT

    report = Path(cfg.paths.curated) / INGEST_REPORT
    data = json.loads(report.read_text()).get("revisions", {}) if report.exists() else {}
    return {
        "model": {"base": redact(cfg.model.base), "requested": cfg.model.revision, "resolved": base_revision},
        "data": data,
    }


def revision_tags(revisions: dict[str, Any]) -> dict[str, str]:
    """The resolved revisions as flat tags: model.revision, data.<source>.revision ("null": a local folder)."""
    tags = {"model.revision": str(revisions["model"]["resolved"] or "null")}
    tags.update({f"data.{name}.revision": str(entry["commit"] or "null") for name, entry in revisions["data"].items()})
    return tags


def build_manifest(
    cfg: Config, lock_file: Path = Path("dvc.lock"), revisions: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything known when the training run starts (revisions: resolved_revisions')."""
    commit, dirty = git_state()
    curated = Path(cfg.paths.curated)
    params = cfg.model_dump(mode="json")  # the whole configuration, a record of the run (not an input of it)
    return {
        "sftops_manifest": 1,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": redact(" ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])),
        "git": {"commit": commit, "dirty": dirty},
        "dvc_lock_sha256": file_sha256(lock_file) if lock_file.exists() else None,
        "params": params,
        "params_sha256": params_sha256(cfg),
        "seeds": {
            "train.seed": params["train"]["seed"],
            "data.split_seed": params["data"]["split_seed"],
            "evaluate.sample_seed": params["evaluate"]["sample_seed"],
            "evaluate.bootstrap_seed": params["evaluate"]["bootstrap_seed"],
        },
        "hardware": hardware(),
        "libraries": library_versions(),
        "data": {"curated_dvc_md5": dvc_md5(curated), "files": folder_hashes(curated) if curated.exists() else {}},
        "revisions": revisions if revisions is not None else resolved_revisions(cfg, None),
    }


def model_section(model_dir: Path) -> dict[str, Any]:
    """Hashes of the saved model: every file, and the tokenizer and chat template it renders with."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "chat_template_sha256": chat_template_sha256(tokenizer),
        "files": folder_hashes(model_dir),
    }
