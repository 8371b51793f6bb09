"""What the device a run trains on offers and reports: its name, its dense peak FLOP/s (what MFU is measured
against), the memory free on it, its peak memory so far, and its energy counter (NVML). Asked by the cost meter
(train/cost.py) and the pre-flight check (plan/fit.py); nothing here changes the device."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch

GIB = 1024**3

# Dense (no sparsity) bf16/fp16 tensor-core peak per GPU, TFLOP/s, from the vendors' datasheets; the first name
# contained in torch's device name wins, so the longer names come first. cost.peak_tflops overrides it.
DENSE_PEAK_TFLOPS = {
    "GH200": 989.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "H800": 989.0,
    "B200": 2250.0,
    "B100": 1750.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 6000 Ada": 364.0,
    "RTX A6000": 155.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
    "MI300X": 1307.0,
    "MI250X": 383.0,
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def dense_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense peak, or None where it is unknown (a CPU, or a GPU not in the table)."""
    if override is not None:
        return override
    return peak_for_name(device_name(device)) if device.type == "cuda" else None


def peak_for_name(name: str) -> float | None:
    """The table's peak for a GPU's name as torch reports it ("NVIDIA H100 80GB HBM3"), None if it is not listed."""
    return next((peak for key, peak in DENSE_PEAK_TFLOPS.items() if key in name), None)


def _meminfo_bytes(field: str) -> int | None:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def _cgroup_room() -> int | None:
    """What a container's memory limit (cgroup v2) still allows this cgroup, if it sets one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def free_memory(device: torch.device) -> int:
    """Bytes a run could still take on the device: a GPU's free memory, or on CPU the RAM available (within the
    cgroup's limit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = _meminfo_bytes("MemAvailable") or 0
    room = _cgroup_room()
    return min(available, room) if room is not None else available


def rss_bytes() -> int:
    """This process's resident memory now."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident memory (since it started, or since reset_peak_rss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(device: torch.device) -> bool:
    """Start the peaks afresh: the accelerator's allocator statistics, and the process's peak RSS (Linux: writing
    5 to /proc/self/clear_refs). False when the RSS peak could not be reset (it then counts from the start)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory(device: torch.device) -> dict[str, int | None]:
    """Peak bytes since the last reset: allocated and reserved by the accelerator's allocator (None on CPU), and the
    process's resident memory."""
    cuda = device.type == "cuda"
    return {
        "allocated": torch.cuda.max_memory_allocated(device) if cuda else None,
        "reserved": torch.cuda.max_memory_reserved(device) if cuda else None,
        "rss": peak_rss_bytes(),
    }


def energy_counter_mj(device: torch.device) -> int | None:
    """The GPU's energy counter in millijoules since its driver loaded (NVML, Volta and newer); None where the
    device does not report one (a CPU, an older GPU, no NVML)."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:  # NVML counts every GPU of the machine; torch only the visible ones
            index = int(visible.split(",")[index])
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(index)))
    except Exception:  # noqa: BLE001 - NVML absent, not supported, or a UUID in CUDA_VISIBLE_DEVICES: not reported
        return None
