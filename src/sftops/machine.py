"""What this machine has: the device to compute on, whether CUDA-only features can run, where an installed
package lives. A leaf: it imports nothing of sftops but the errors, so anything may ask it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from sftops.errors import DataError, ModelError

if TYPE_CHECKING:
    import torch


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def device() -> torch.device:
    """The GPU when there is one (detected, not configured), else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require_hardware(method: str, attn_implementation: str = "sdpa") -> None:
    """QLoRA's 4-bit kernels (bitsandbytes), FlashAttention and FlexAttention's backward exist for CUDA GPUs only:
    refuse early (before the train or evaluate stage loads a model), naming the fix."""
    if attn_implementation == "flash_attention_2" and not cuda_available():
        raise ModelError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU and none is visible; "
            "use model.attn_implementation=sdpa"
        )
    if attn_implementation == "flex_attention" and not cuda_available():
        # FlexAttention's forward runs on the CPU, but its backward does not: training would stop at step 1.
        raise ModelError(
            "model.attn_implementation=flex_attention trains only on a CUDA GPU (FlexAttention has no CPU "
            "backward) and none is visible; use model.attn_implementation=sdpa"
        )
    if method != "qlora":
        return
    if not cuda_available():
        raise ModelError(
            "train.method=qlora needs a CUDA GPU (4-bit bitsandbytes kernels) and none is visible; "
            "use train.method=lora"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("train.method=qlora needs the bitsandbytes package: pip install bitsandbytes") from None


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed (pip install it, or fix data.sources)")
    return Path(next(iter(spec.submodule_search_locations)))
