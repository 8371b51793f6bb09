"""Training checkpoints that are either complete or invisible.

A checkpoint is a folder step-NNNNNN/ holding the trainable weights (safetensors), the optimizer, scheduler,
RNG and loop state (a torch file read back with weights_only=True, so loading it runs no pickled code), and
manifest.json with the SHA-256 of both. It is written under a temporary name and renamed into place only
once complete and flushed to disk, and a folder whose files do not match its manifest is never loaded."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sftops import faults

MANIFEST = "manifest.json"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
PREFIX = "step-"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save(folder: Path, name: str, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write checkpoint `name` (the trainable weights and the loop state) into `folder` atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    tmp = folder / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
    faults.point(f"checkpoint_write:{name}")
    torch.save(state, tmp / STATE)
    manifest = {"name": name, "files": {f: _sha256(tmp / f) for f in (WEIGHTS, STATE)}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for f in (WEIGHTS, STATE, MANIFEST):
        _fsync(tmp / f)
    old = folder / f".{name}.old"
    if final.exists():  # replacing e.g. "best": move the old one aside first, so a crash leaves one valid copy
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _fsync(folder)
    shutil.rmtree(old, ignore_errors=True)
    return final


def is_valid(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all(_sha256(path / f) == digest for f, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def latest(folder: Path) -> Path | None:
    """The newest step checkpoint whose files match their manifest."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob(f"{PREFIX}*"), reverse=True):
        if is_valid(path):
            return path
    return None


def prune(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints (and any leftover temporary folders)."""
    for tmp in folder.glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    for path in sorted(folder.glob(f"{PREFIX}*"), reverse=True)[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def load(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the trainable weights into `model` and return the saved loop state."""
    weights = load_file(path / WEIGHTS)
    params = dict(model.named_parameters())
    missing = set(weights) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise ValueError(f"checkpoint {path} does not match the model: {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))
    return torch.load(path / STATE, weights_only=True)
