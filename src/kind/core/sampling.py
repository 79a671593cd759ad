"""Generating images from a model, on one process or spread over the ranks of a torchrun job.

Each sample draws its noise from its own generator seeded by (seed, class, its index among that
class's samples) (`kind.core.seeds`), so the same seed gives the same samples whatever the batch
size, the number of ranks, or which other classes are drawn alongside; that is also what lets an
assembled model reproduce the full model's samples.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from tqdm.auto import tqdm

from kind.core.diffusion import Diffusion, DiffusionConfig
from kind.core.distributed import DistInfo
from kind.core.images import to_uint8
from kind.core.seeds import NULL_CLASS, class_indices, sample_seed


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
    guided_channels: int | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    indices: list[int] | None = None,
    progress: bool = False,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Images uint8 [N, C, H, W] for class ids `labels` (indices into model.config.class_names).

    `indices[i]`: sample i's index among its class's samples, which seeds its noise (default:
    its place among the samples of its class in `labels`; a rank drawing a share of a larger
    list passes the indices of its share in the whole list).
    `decode` maps a latent model's samples to uint8 images (see `kind.data.vae.decoder`)."""
    if not labels:
        raise ValueError("nothing to sample: the label list is empty")
    diff = diffusion if isinstance(diffusion, Diffusion) else Diffusion(diffusion)
    cfg, device = model.config, torch.device(device)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    names = [cfg.class_names[c] if c != model.null_id else NULL_CLASS for c in labels]
    indices = class_indices(labels) if indices is None else indices
    was_training = model.training
    model.eval()
    out = []
    bar = tqdm(
        total=len(labels) * steps, desc="sampling", unit="step", disable=not progress, leave=False
    )
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size]
        gens = [
            torch.Generator(device).manual_seed(sample_seed(seed, names[i], indices[i]))
            for i in range(start, start + len(chunk))
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
            guided_channels=guided_channels,
            generators=gens,
            learn_sigma=cfg.learn_sigma,
            progress=partial(_counted, bar=bar, n=len(chunk)),
        )
        out.append((decode(x) if decode else to_uint8(x)).cpu())
    bar.close()
    model.train(was_training)
    return torch.cat(out)


def generate_sharded(
    model, diffusion, labels: list[int], info: DistInfo, **kwargs
) -> torch.Tensor | None:
    """`generate` spread over the ranks of a torchrun job (`info`: this rank's DistInfo):
    each rank draws a contiguous share and rank 0 returns them all, in order (other ranks return
    None). Per-sample seeds make the result the same as one process drawing everything. With
    fewer labels than ranks·share, the last ranks draw nothing and send nothing.

    Rank 0 receives each share straight into its rows of the one output tensor, over
    `info.host` (a gloo group under NCCL, so the shares stay in host memory): the samples are
    held about once, not pickled, unpickled and concatenated (4x them with `gather_object`;
    FID-50K at 256 px is 9.8 GB of uint8)."""
    if not labels:  # on every rank, before any of them waits for the others
        raise ValueError("nothing to sample: the label list is empty")
    per = -(-len(labels) // info.world)
    starts = range(0, len(labels), per)  # rank r draws labels[starts[r] : starts[r] + per]
    lo, hi = info.rank * per, (info.rank + 1) * per
    share, mine = labels[lo:hi], None
    if share:
        indices = class_indices(labels)[lo:hi]  # each sample's index in the whole list's class
        mine = generate(model, diffusion, share, indices=indices, device=info.device, **kwargs)
    if info.world == 1:
        return mine
    import torch.distributed as dist

    if not info.is_main:
        if mine is not None:
            dist.send(mine.contiguous(), dst=0, group=info.host)
        return None
    # rank 0 always draws (its share is the first), so its images give the per-sample shape
    out = mine.new_empty((len(labels), *mine.shape[1:]))  # [N, C, H, W]
    out[: len(mine)] = mine
    del mine
    for rank, start in enumerate(starts[1:], start=1):
        dist.recv(out[start : start + per], src=rank, group=info.host)
    return out


def _counted(timesteps, bar, n):
    for t in timesteps:
        yield t
        bar.update(n)
