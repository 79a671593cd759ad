"""The one place a device name ("auto", "cpu", "cuda", "cuda:N") becomes a torch.device."""

from __future__ import annotations

import torch


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto": this rank's GPU when CUDA is available, else the CPU; a clear error when a CUDA
    device is asked for on a machine without one."""
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise ValueError(f"unknown device {preference!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {preference!r} asks for CUDA, but no CUDA device is available here; "
            "use cpu (or auto)"
        )
    if device.type == "cuda" and device.index is None:  # "cuda" under torchrun: this rank's GPU
        device = torch.device("cuda", local_rank)
    return device
