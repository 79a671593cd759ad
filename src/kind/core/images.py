"""Images as the model sees them and as files: the [-1, 1] model range and uint8 pixels, PNG grids,
and sample sets in the ADM evaluator's `.npz` layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kind.io import atomic_file


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [...] in 0..255 -> float32 [...] in [-1, 1]."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor, got {images_uint8.dtype}")
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [...] in [-1, 1] -> uint8 [...] in 0..255 (clamped, rounded)."""
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> Image.Image:
    """uint8 [N, C, H, W] -> one PIL image, `nrow` images per row."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, col = divmod(i, nrow)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + col * (w + pad) : pad + col * (w + pad) + w,
        ] = img
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


# A grid is a preview: at most this many classes (rows) and samples a class (columns). FID-50K's
# 50 a class of 1,000 classes in full would be a 12,900 x 258,000 pixel PNG.
GRID_CLASSES, GRID_PER_CLASS = 64, 16


def save_grid(images: torch.Tensor, per_class: int, path: Path) -> None:
    """uint8 [classes · per_class, C, H, W], class after class, as a PNG with a row a class: the
    first GRID_PER_CLASS samples of the first GRID_CLASSES classes."""
    rows = images.unflatten(0, (-1, per_class))[:GRID_CLASSES, :GRID_PER_CLASS]
    # rows: [classes, per_class, C, H, W]
    with atomic_file(path) as tmp:
        image_grid(rows.flatten(0, 1), rows.shape[1]).save(tmp, format="PNG")


def save_npz(
    path: Path, images: torch.Tensor, labels: list[int], class_names: list[str], **meta
) -> None:
    """`arr_0` uint8 [N, H, W, C] (the ADM evaluator's layout), `labels`, `class_names`, and
    generation metadata as 0-d arrays; loads with allow_pickle=False."""
    extra = {k: np.asarray(v) for k, v in meta.items() if v is not None}
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            arr_0=images.permute(0, 2, 3, 1).numpy(),
            labels=np.asarray(labels, np.int64),
            class_names=np.asarray(class_names, dtype=str),
            **extra,
        )
