"""The names a latent store is made of on disk, and how to recognise one: a module of its own so
that the image reader (kind.data.images, which the latent path builds on) can tell a store
from an image folder without importing the latent path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FORMAT = "kind-latents/1"
LATENTS_FILE, LABELS_FILE, META_FILE = "latents.npy", "labels.npy", "meta.json"
STORE_DTYPE = np.float16  # of latents.npy


def is_store(path: str | Path) -> bool:
    """Whether ``path`` is a latent store directory, so a data spec can name a store or an image
    folder alike: its meta.json carries this format's tag, or it holds a latents.npy beside a
    meta.json (a damaged store, or one of another version: opening it says what is wrong, where
    reading it as an image folder would mislead)."""
    root = Path(path).expanduser()
    if not (root / META_FILE).is_file():
        return False
    if (root / LATENTS_FILE).is_file():
        return True
    try:
        return json.loads((root / META_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):  # ValueError: not JSON, not UTF-8
        return False
