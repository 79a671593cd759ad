"""The one place a device name ("auto", "cpu", "cuda", "cuda:N") becomes a torch.device."""

from __future__ import annotations

import torch


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto": this rank's GPU when CUDA is available, else the CPU; a clear error when a CUDA
    device is asked for on a machine without one."""
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "train.device asks for cuda, but no CUDA device is available here; "
            "use --set train.device=cpu (or auto)"
        )
    return device
