"""The ADM ``.npz`` layout that sample files and reference batches share, read one way.

Both hold uint8 images ``[N, H, W, C]`` under ``arr_0`` and their metadata as 0-d arrays, and both
come from outside this process, so they are opened without pickle and refused with a message that
says what was expected. The version this tool stamps on what it writes lives here too, because
the result JSON and the reference batches both carry it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def tool_version() -> str:
    """The installed distribution's version, else the source tree's ``kind.__version__``."""
    from importlib import metadata

    try:
        return metadata.version("kind-dit")
    except metadata.PackageNotFoundError:
        import kind

        return getattr(kind, "__version__", "unknown")


def open_npz(path: Path, what: str, expected: str, hint: str) -> np.lib.npyio.NpzFile:
    """Open ``path`` (``allow_pickle=False``) as an ``.npz``; the errors name the file as a
    ``what`` file, say it should be ``expected`` when it holds a single array, and end with
    ``hint`` when numpy cannot read it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:  # numpy's message suggests allow_pickle: not the fix
        raise ValueError(f"{path} is not a {what} .npz (numpy: {e}); pass {hint}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds one array, not {expected}")
    return npz


def scalars(npz: np.lib.npyio.NpzFile, arrays: tuple[str, ...]) -> dict:
    """The file's 0-d entries other than ``arrays``, as JSON-friendly Python scalars."""
    out = {}
    for key in npz.files:
        if key in arrays:  # not read: arr_0 can be gigabytes
            continue
        value = npz[key]
        if value.ndim == 0:
            item = value.item()
            out[key] = item.decode() if isinstance(item, bytes) else item
    return out


def nchw(arr: np.ndarray) -> torch.Tensor | None:
    """ADM images (uint8 ``[N, H, W, C]``, C = 1 or 3) as uint8 ``[N, C, H, W]``; None when
    ``arr`` is not in that layout (the caller says what it expected)."""
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        return None
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))  # NHWC → NCHW
