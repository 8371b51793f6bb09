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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sftops import faults, hub

if TYPE_CHECKING:
    from sftops.config import Config
    from sftops.train.distributed import World

MANIFEST = "manifest.json"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
PREFIX = "step-"
BEST = "best"  # the weights of the best validation so far
DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint once every process's shards are written


def checkpoint_folder(cfg: Config, base_revision: str | None = None) -> Path:
    """Checkpoints of this exact training job (model, train params, curated data): a re-run of the same job
    resumes; a changed one starts afresh in its own folder. How many processes run it, and how each process
    splits its share into accumulation steps, is not part of the job: a sharded job resumes on any number of
    processes that takes the same micro-batches per step (setup.same_batches_per_step). base_revision: the hub
    commit model.revision resolved to (a branch that moved on is another base: training starts afresh)."""
    from sftops.provenance.manifest import dvc_md5

    train = cfg.train.model_dump(mode="json", exclude={"num_processes", "grad_accum_steps"})
    model = cfg.model.model_dump(mode="json")
    if hub.is_commit(base_revision):
        model["revision"] = base_revision
    job = {"model": model, "train": train, "data": dvc_md5(Path(cfg.paths.curated))}
    digest = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.paths.checkpoints) / digest


class Saver:
    """A run's checkpoints in its job folder (None: the run keeps none). With FSDP (`dcp`) every process writes
    its own shards and nothing is gathered; the main process adds the loop state and renames the folder into
    place. Collective: every process calls save()."""

    def __init__(
        self,
        folder: Path | None,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        world: World,
        dcp: bool,
        keep: int,
    ) -> None:
        self.folder, self.model, self.optimizer, self.scheduler = folder, model, optimizer, scheduler
        self.world, self.dcp, self.keep = world, dcp, keep

    def latest(self) -> Path | None:
        return latest(self.folder) if self.folder else None

    def save(self, name: str, loop_state: dict[str, Any]) -> Path | None:
        if self.folder is None:
            return None
        world = self.world
        if self.dcp:
            if world.is_main:
                start(self.folder, name)
            world.barrier()
            write_shards(temporary(self.folder, name), self.model, self.optimizer)
            faults.point(f"checkpoint_write:{name}")
            world.barrier()
        path = None
        if world.is_main:
            state = {"scheduler": self.scheduler.state_dict(), "rng": rng_state(), "loop": loop_state}
            if self.dcp:
                path = commit(self.folder, name, state)
            else:
                state["optimizer"] = self.optimizer.state_dict()
                path = save(self.folder, name, trainable_state(self.model), state)
            if name.startswith(PREFIX):
                prune(self.folder, self.keep)
        world.barrier()
        return path

    def load_best(self) -> None:
        """The best validated weights back into the model (the weights exported, not the last)."""
        best = self.folder / BEST
        load_sharded(best, self.model) if is_sharded(best) else load(best, self.model)


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
