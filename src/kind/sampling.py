"""Generating images from a model, and writing them as a PNG grid and an ADM-layout `.npz`.

Each sample draws its noise from its own generator seeded by (seed, index), so the same seed gives
the same samples whatever the batch size, the number of ranks, or which other classes are drawn
alongside; that is also what lets an assembled model reproduce the full model's samples.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from kind.checkpoint import atomic_file
from kind.diffusion import Diffusion, DiffusionConfig


def sample_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


@torch.no_grad()
def generate(
    model,
    diffusion: DiffusionConfig | Diffusion,
    labels: list[int],
    *,
    seed: int = 0,
    sampler: str = "ddim",
    steps: int = 50,
    cfg_scale: float = 1.5,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    first_index: int = 0,
    progress: bool = False,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Images uint8 [N, C, H, W] for class ids `labels` (indices into model.config.class_names).

    `first_index` offsets the per-sample seeds, for sampling a slice of a larger set (ranks).
    `decode` maps a latent model's samples to uint8 images (see `kind.latents.decoder`)."""
    from kind.data import to_uint8

    diff = diffusion if isinstance(diffusion, Diffusion) else Diffusion(diffusion)
    cfg, device = model.config, torch.device(device)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    was_training = model.training
    model.eval()
    out = []
    bar = tqdm(
        total=len(labels) * steps, desc="sampling", unit="step", disable=not progress, leave=False
    )
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size]
        gens = [
            torch.Generator(device).manual_seed(sample_seed(seed, first_index + start + i))
            for i in range(len(chunk))
        ]
        y = torch.tensor(chunk, dtype=torch.long, device=device)
        x = diff.sample(
            model,
            y,
            shape,
            null_id=model.null_id,
            sampler=sampler,
            steps=steps,
            cfg_scale=cfg_scale,
            generators=gens,
            learn_sigma=cfg.learn_sigma,
            progress=partial(_counted, bar=bar, n=len(chunk)),
        )
        out.append(decode(x) if decode else to_uint8(x).cpu())
    bar.close()
    model.train(was_training)
    return torch.cat(out)


def generate_sharded(model, diffusion, labels: list[int], info, **kwargs) -> torch.Tensor | None:
    """`generate` spread over the ranks of a torchrun job (`info`: kind.distributed.DistInfo):
    each rank draws a contiguous share and rank 0 returns them all, in order (other ranks return
    None). Per-sample seeds make the result the same as one process drawing everything."""
    per = -(-len(labels) // info.world)
    start = info.rank * per
    mine = generate(model, diffusion, labels[start : start + per], first_index=start,
                    device=info.device, **kwargs)  # fmt: skip
    if info.world == 1:
        return mine
    import torch.distributed as dist

    shares = [None] * info.world if info.is_main else None
    dist.gather_object(mine, shares, dst=0)
    return torch.cat(shares) if info.is_main else None


def _counted(timesteps, bar, n):
    for t in timesteps:
        yield t
        bar.update(n)


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


def save_grid(images: torch.Tensor, nrow: int, path: Path) -> None:
    with atomic_file(path) as tmp:
        image_grid(images, nrow).save(tmp, format="PNG")


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
