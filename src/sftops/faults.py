"""Fault injection for the reliability tests: SFTOPS_FAULT=<point> makes the process SIGKILL itself when it
reaches that point (e.g. after_step:5, checkpoint_write:step-000004), exactly as an OOM killer or a lost node
would. Unset, it does nothing."""

from __future__ import annotations

import os
import signal

VARIABLE = "SFTOPS_FAULT"


def point(name: str) -> None:
    if os.environ.get(VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)
