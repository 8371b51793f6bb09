"""Fault injection for the reliability tests: SFTOPS_FAULT=<point> makes the process fail at that point
exactly as the real fault would: SIGKILL itself (after_step:5, checkpoint_write:step-000004), as an OOM killer
or a lost node would; find the disk full (disk_full:output:raw); or run out of GPU memory (cuda_oom:step:2).
Unset, it does nothing."""

from __future__ import annotations

import errno
import os
import signal

VARIABLE = "SFTOPS_FAULT"


def point(name: str) -> None:
    if os.environ.get(VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def disk_full(name: str) -> None:
    if os.environ.get(VARIABLE) == f"disk_full:{name}":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)


def out_of_memory(name: str) -> None:
    if os.environ.get(VARIABLE) == f"cuda_oom:{name}":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {name}). Tried to allocate 2.00 GiB")


def pause(name: str) -> None:
    """SFTOPS_PAUSE=<point>[,<point>...] and SFTOPS_PAUSE_DIR=<folder>: at that point, create
    <folder>/<point>.reached and wait for <folder>/<point>.go, so that a test can act (kill a server) at an
    exact moment of a run in another process."""
    if name not in os.environ.get("SFTOPS_PAUSE", "").split(","):
        return
    import time
    from pathlib import Path

    folder = Path(os.environ["SFTOPS_PAUSE_DIR"])
    (folder / f"{name}.reached").touch()
    while not (folder / f"{name}.go").exists():
        time.sleep(0.1)


def after_step(step: int, record: object = None) -> None:
    """The training loop's step hook: after_step:<step> kills or pauses the process once that step is complete
    (validated and checkpointed)."""
    point(f"after_step:{step}")
    pause(f"after_step:{step}")
