"""The ADM ``.npz`` layout that sample files and reference batches share, read one way.

Both hold uint8 images ``[N, H, W, C]`` under ``arr_0`` and their metadata as 0-d arrays, and both
come from outside this process, so they are opened without pickle and refused with a message that
says what was expected. The version this tool stamps on what it writes lives here too, because
the result JSON and the reference batches both carry it.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def open_npz(path: Path, what: str, expected: str, hint: str) -> Iterator[np.lib.npyio.NpzFile]:
    """Open ``path`` (``allow_pickle=False``) as an ``.npz`` for the reads in the ``with`` block;
    the errors name the file as a ``what`` file, say it should be ``expected`` when it holds a
    single array, and end with ``hint`` when numpy cannot read it, at opening or (a truncated or
    corrupted member) while reading."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # not numpy's pickle hint
        raise ValueError(f"{path} is not a {what} .npz (numpy: {e}); pass {hint}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds one array, not {expected}")
    with npz:
        try:
            yield npz
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise ValueError(f"{path} is a damaged {what} .npz ({e}); pass {hint}") from e
        except ValueError as e:
            if str(e).startswith(("EOF", "cannot reshape")):  # numpy: a member cut short
                raise ValueError(f"{path} is a damaged {what} .npz ({e}); pass {hint}") from e
            if "allow_pickle" not in str(e):  # ours, or a layout check: already says what
                raise
            raise ValueError(
                f"{path} holds an array of Python objects, which loading would unpickle (code "
                f"from the file) and kind-dit never does; save numeric arrays and pass {hint}"
            ) from e


def scalars(npz: np.lib.npyio.NpzFile, arrays: tuple[str, ...]) -> dict:
    """The file's 0-d entries other than ``arrays``, as JSON-friendly Python scalars (numbers
    JSON cannot hold, such as NaN or complex, and dates as their text)."""
    out = {}
    for key in npz.files:
        if key in arrays:  # not read: arr_0 can be gigabytes
            continue
        value = npz[key]
        if value.ndim == 0:
            item = value.item()
            if isinstance(item, bytes):
                item = item.decode(errors="replace")
            elif not isinstance(item, (bool, int, str)) and not (
                isinstance(item, float) and math.isfinite(item)
            ):
                item = str(item)
            out[key] = item
    return out


def name_list(path: Path, names: np.ndarray | None) -> list[str] | None:
    """The file's ``class_names`` entry as a list, checked to be one name a class."""
    if names is None:
        return None
    if names.ndim != 1:
        raise ValueError(
            f"{path}: 'class_names' must be a 1-d array of names, got shape {names.shape}"
        )
    listed = [str(c) for c in names]
    twice = sorted({c for c in listed if listed.count(c) > 1})
    if twice:
        raise ValueError(
            f"{path}: 'class_names' lists {', '.join(map(repr, twice[:3]))} more than once; the "
            "file is damaged or was edited (one name a class)"
        )
    return listed


def nchw(arr: np.ndarray) -> torch.Tensor | None:
    """ADM images (uint8 ``[N, H, W, C]``, C = 1 or 3, square) as uint8 ``[N, C, H, W]``; None
    when ``arr`` is not in that layout (the caller says what it expected)."""
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        return None
    if arr.shape[1] != arr.shape[2]:  # evaluation loads a square reference at their size
        return None
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))  # NHWC → NCHW
