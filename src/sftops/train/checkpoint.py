"""Training checkpoints that are either complete or invisible.

A checkpoint is a folder step-NNNNNN/ holding the trainable weights (safetensors), the optimizer, scheduler,
RNG and loop state (a torch file read back with weights_only=True, so loading it runs no pickled code), and
manifest.json with the SHA-256 of both. It is written under a temporary name and renamed into place only
once complete and flushed to disk, and a folder whose files do not match its manifest is never loaded.

With FSDP the checkpoint is sharded: every process writes its own shards of the trainable weights and the
optimizer state with torch.distributed.checkpoint (DCP; nothing is gathered to one process), into the same
temporary folder on a filesystem all nodes share; the main process adds state.pt and the manifest and renames
it. DCP reshards on load, so a job saved by N processes resumes on M. The manifest hashes state.pt and DCP's
metadata and records each shard's size (hashing hundreds of GB of shards on one process would undo the point)."""

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
DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint once every process's shards are written


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
    tmp = start(folder, name)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
    faults.point(f"checkpoint_write:{name}")
    return commit(folder, name, state)


def temporary(folder: Path, name: str) -> Path:
    return folder / f".{name}.tmp"


def start(folder: Path, name: str) -> Path:
    """The empty temporary folder checkpoint `name` is written into (on the main process only)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = temporary(folder, name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit(folder: Path, name: str, state: dict[str, Any]) -> Path:
    """Add the loop state and the manifest to the temporary folder, flush it and rename it into place."""
    tmp, final = temporary(folder, name), folder / name
    torch.save(state, tmp / STATE)
    shards = sorted(f.name for f in tmp.glob("*.distcp"))
    hashed = [f for f in (WEIGHTS, DCP_METADATA, STATE) if (tmp / f).exists()]
    manifest = {
        "name": name,
        "files": {f: _sha256(tmp / f) for f in hashed},
        "shards": {f: (tmp / f).stat().st_size for f in shards},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for f in (*hashed, *shards, MANIFEST):
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
        sizes = all((path / f).stat().st_size == size for f, size in manifest.get("shards", {}).items())
        return sizes and all(_sha256(path / f) == digest for f, digest in manifest["files"].items())
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


def is_sharded(path: Path) -> bool:
    return (path / DCP_METADATA).exists()


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The trainable weights and the optimizer state as this process holds them (its shards under FSDP), keyed
    by parameter name, so that any number of processes can read them back."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = {n: t for n, t in get_model_state_dict(model).items() if n in trainable}
    if optimizer is None:
        return {"model": weights}
    return {"model": weights, "optimizer": get_optimizer_state_dict(model, optimizer)}


def write_shards(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its own shards into `tmp` (collective: all processes call it)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(model, optimizer), checkpoint_id=tmp, no_dist=not torch.distributed.is_initialized())


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Read a sharded checkpoint into `model` (sharded or not; DCP reshards) and `optimizer` (None: weights
    only); return the saved loop state. Collective: all processes call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    state = _sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return torch.load(path / STATE, weights_only=True)


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
