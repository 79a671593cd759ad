"""Generating images from a model, on one process or spread over the ranks of a torchrun job.

Each sample draws its noise from its own generator seeded by (seed, class, its index among that
class's samples) (`kind.core.seeds`), so the same seed gives the same samples whatever the batch
size, the number of ranks, or which other classes are drawn alongside; that is also what lets an
assembled model reproduce the full model's samples.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from kind.core.diffusion import Diffusion, DiffusionConfig
from kind.core.distributed import DistInfo, broadcast_object
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


class Chunks(Protocol):
    """Where `generate_sharded` keeps finished chunks so a stopped job continues (rank 0's; see
    `kind.store.partial_samples`): their size, which are done, and reading and writing one."""

    size: int

    def done(self) -> set[int]: ...

    def read(self, k: int) -> torch.Tensor: ...

    def write(self, k: int, images: torch.Tensor) -> None: ...


def chunk_size(n: int, world: int, batch_size: int) -> int:
    """Samples a chunk for `n` samples over `world` ranks: at most `batch_size`, and as many
    chunks as the rounds need, evenly (1,024 over 3 ranks at 256 a batch: 6 chunks of 171,
    2 rounds; not 4 of 256, where a second round would keep rank 0 alone at work)."""
    rounds = -(-n // (world * batch_size))
    return -(-n // (world * rounds))


def generate_sharded(
    model,
    diffusion,
    labels: list[int],
    info: DistInfo,
    *,
    batch_size: int = 256,
    chunks: Chunks | None = None,
    progress: bool = False,
    **kwargs,
) -> torch.Tensor | None:
    """`generate` spread over the ranks of a torchrun job (`info`: this rank's DistInfo): rank
    0 returns every sample, in order (other ranks return None). Per-sample seeds make the result
    the same as one process drawing everything.

    The labels are cut into chunks (`labels[k·size : (k+1)·size]`, `chunk_size` samples,
    or `chunks.size` for a job that keeps them), dealt out round by round: in
    each round rank r draws the round's r-th chunk and rank 0 receives the others' straight into
    its rows of the one output tensor, over `info.host` (a gloo group under NCCL, so they stay in
    host memory): the samples are held about once, not pickled and concatenated (4x them with
    `gather_object`; FID-50K at 256 px is 9.8 GB of uint8). With `chunks` (on rank 0) each
    round's chunks are also written as they arrive, and chunks already written are read
    instead of drawn: a stopped job continues, on any number of ranks."""
    if not labels:  # on every rank, before any of them waits for the others
        raise ValueError("nothing to sample: the label list is empty")
    n = len(labels)
    plan = None
    if info.is_main:
        size = chunks.size if chunks is not None else chunk_size(n, info.world, batch_size)
        plan = (size, sorted(chunks.done()) if chunks is not None else [])
    size, done = broadcast_object(plan, info)  # one small collective a call
    todo = [k for k in range(-(-n // size)) if k not in set(done)]
    rows = lambda k: slice(k * size, min(n, (k + 1) * size))  # noqa: E731 (chunk k's samples)
    indices = class_indices(labels)  # each sample's index in the whole list's class
    out = None
    bar = tqdm(total=sum(rows(k).stop - rows(k).start for k in todo), desc="sampling",
               unit="sample", disable=not (progress and info.is_main), leave=False)  # fmt: skip
    for first in range(0, len(todo), info.world):
        round_ = todo[first : first + info.world]  # rank r draws round_[r]
        mine = None
        if info.rank < len(round_):
            part = rows(round_[info.rank])
            mine = generate(model, diffusion, labels[part], indices=indices[part],
                            batch_size=batch_size, device=info.device, **kwargs)  # fmt: skip
        if not info.is_main:
            if mine is not None:
                dist.send(mine.contiguous(), dst=0, group=info.host)
            continue
        if out is None:  # rank 0 draws in every round: its chunk gives the per-sample shape
            out = mine.new_empty((n, *mine.shape[1:]))  # [N, C, H, W]
        out[rows(round_[0])] = mine
        del mine
        for rank, k in enumerate(round_[1:], start=1):
            dist.recv(out[rows(k)], src=rank, group=info.host)
        for k in round_ if chunks is not None else ():
            chunks.write(k, out[rows(k)])
        bar.update(sum(rows(k).stop - rows(k).start for k in round_))
    bar.close()
    if not info.is_main:
        return None
    for k in done:  # drawn by an earlier start of this job
        images = chunks.read(k)  # [chunk, C, H, W]
        if out is None:
            out = images.new_empty((n, *images.shape[1:]))
        out[rows(k)] = images
    return out


def _counted(timesteps, bar, n):
    for t in timesteps:
        yield t
        bar.update(n)
