"""Several processes through torchrun (DDP): who am I, summing across processes, and launching torchrun.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a process started without them is a world of one."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from sftops.errors import TrainingError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Elementwise sum over all processes (float64, so token counts stay exact)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


SOLO = World()  # a world of one process on the CPU (frozen, so one instance serves as every default)


def agree(world: World, fingerprints: dict[str, str]) -> None:
    """Every process must run the same job: each named fingerprint (the params, the curated data) is compared with
    rank 0's; on a mismatch every process stops with the same one-line error naming the node."""
    if world.size == 1:
        return
    import socket

    mine = {**fingerprints, "host": socket.gethostname(), "node": os.environ.get("GROUP_RANK", "?")}
    everyone: list[dict[str, str]] = [{} for _ in range(world.size)]
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        for key in fingerprints:
            if theirs[key] != everyone[0][key]:
                raise TrainingError(
                    f"rank {rank} (node {theirs['node']}, {theirs['host']}) has {key} {theirs[key]}, rank 0 (node "
                    f"{everyone[0]['node']}) has {everyone[0][key]}: every node must run the same params.yaml on the "
                    f"same curated data (copy them to every node, or put the project on a shared filesystem)"
                )


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join() -> World:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU), or a world of one."""
    cuda = torch.cuda.is_available()
    if not under_torchrun():
        return World(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=device)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(num_processes: int, params_file: Path) -> None:
    """Re-run `sftops train` under torchrun on this node, with the already-resolved config."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={num_processes}",
        "-m",
        "sftops",
        "train",
        "--params",
        str(params_file),
    ]
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise TrainingError(
            f"torchrun with {num_processes} processes failed (exit {done.returncode}); see the log above"
        )
