"""The one place a device name ("auto", "cpu", "cuda", "cuda:N") becomes a torch.device."""

from __future__ import annotations

import torch

# CPU threads a command may ask torch for: far past any machine's cores, short of the thread
# counts at which OpenMP fails to create them (or the process crashes)
MAX_THREADS = 1024


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto": this rank's GPU when CUDA is available, else the CPU; a clear error when a CUDA
    device is asked for on a machine without one."""
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # what kind-dit runs on
        raise ValueError(f"unknown device {preference!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {preference!r} asks for CUDA, but no CUDA device is available here; "
            "use cpu (or auto)"
        )
    if device.type == "cuda" and device.index is None:  # "cuda" under torchrun: this rank's GPU
        device = torch.device("cuda", local_rank)
    return device
