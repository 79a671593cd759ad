"""One batched sampling run for samples of many classes, whose every sample comes out exactly as
it would in any other batch.

Per-sample seeds (`kind.core.seeds.sample_seed`) make the *noise* of a sample independent of
its batch. The arithmetic needs two more things on CPU, both measured (torch 2.13, MKL, 1–16
threads), and both kept here by padding the batch with null-class samples whose results are
dropped:

1. A `KindLinear` chooses how to compute from the batch's shape: with few groups for its tokens
   it folds each group's tailor into one dense weight (`W_g = U_G σ_G V_Gᵀ + U_g σ_g V_gᵀ`, one
   product per group block); otherwise it runs the learngene and the tailor paths apart. The two
   round differently. A batch is padded until it folds, P · min(in, out) ≤ tokens for every gated
   layer (P: tailor groups present), which is also how `kind-dit sample` computes a class alone
   as soon as its batch is big enough (n ≥ 4 with guidance for the tiny 28×28 model).
2. BLAS products with few rows give a row a different rounding depending on where it falls or
   how many rows there are. On one 2-core x86-64 machine MKL computed blocks of 4 rows in one
   kernel and the rest in another (row counts 1–3 differed at one thread; 5–7 and 9–11 too at
   two; 17–19 and 25–27 too at sixteen); on an AVX-512 Xeon (2 cores) products of few rows take
   another kernel altogether (`F.linear(x[:n], w, b)` against the first n rows of the same
   product over 600 rows, fp32, one and two threads: with 128 inputs a row n = 1–5 differ; with
   256, 1–10; with 512, 1–15; no larger n up to 600). The
   per-sample products (time and adaLN embeddings: one row a sample) therefore get a multiple
   of 4 rows and at least 16. The per-token products have samples × tokens rows: a multiple of
   4 when the token count is (16 for 28×28 images at patch 7, 256 for 32×32 latents at patch 2),
   else at least one sample's tokens (49 at patch 4), above the counts where MKL varied.

So a request's images do not depend on its batch mates, and equal `kind-dit sample`'s for the
same class, seed and settings whenever that command folds and its own batch is a multiple of 4
rows and at least 16 (e.g. n = 8, 10 or 12 with guidance on the tiny model). GPUs give no such
guarantee (cuBLAS picks kernels by shape).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kind.core.diffusion import Diffusion
from kind.core.images import to_uint8
from kind.core.model import DiT

ROW_BLOCK = 4  # rows MKL computes together (see 2. above)
MIN_ROWS = 16  # fewer rows take MKL's kernel for small products on some CPUs (see 2. above)


@dataclass(frozen=True)
class Settings:
    """How to sample; requests share a batch only when these are equal."""

    sampler: str
    steps: int
    cfg_scale: float
    guided_channels: int | None = None


def padding(model: DiT, samples: int, groups: int, guided: bool) -> int:
    """Null-class samples to add to a batch of `samples` samples of `groups` tailor groups so
    that every gated layer folds and the per-sample products have a multiple of 4 rows, at
    least 16."""
    per_sample = model.grid**2  # tokens
    copies = 2 if guided else 1  # guidance doubles the batch with its null half
    # the null tailor, if any, is one group more once null samples are present (conservative)
    present = groups + (model.config.null_group is not None)
    folds = max((m.fold_rows(present) for _, m in model.gated), default=0)  # tokens to fold
    rows = max(MIN_ROWS, -(-folds // per_sample))  # the fewest per-sample rows (ceil)
    total = max(samples, -(-rows // copies))
    while (total * copies) % ROW_BLOCK:  # at most ROW_BLOCK - 1 more
        total += 1
    return total - samples


@torch.no_grad()
def draw(
    model: DiT,
    diffusion: Diffusion,
    labels: list[int],
    seeds: list[int],
    settings: Settings,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Images uint8 [N, C, H, W] for the model's class ids `labels`, sample i from noise seeded
    `seeds[i]` (its own generator, as `kind.core.sampling.generate` seeds them), in one batched
    sampling run: every step is one forward of the whole mixed batch, the guidance (null) half
    on the learngene alone (`Diffusion.sample`)."""
    cfg, device = model.config, next(model.parameters()).device
    guided = settings.cfg_scale != 1.0
    groups = len({int(model.host_slot_of[c]) for c in labels})
    pad = padding(model, len(labels), groups, guided)
    gens = [torch.Generator(device).manual_seed(s) for s in seeds]
    gens += [torch.Generator(device).manual_seed(0) for _ in range(pad)]  # results dropped
    y = torch.tensor(labels + [model.null_id] * pad, dtype=torch.long, device=device)
    x = diffusion.sample(
        model,
        y,
        (cfg.in_channels, cfg.image_size, cfg.image_size),
        null_id=model.null_id,
        sampler=settings.sampler,
        steps=settings.steps,
        cfg_scale=settings.cfg_scale,
        guided_channels=settings.guided_channels,
        generators=gens,
        learn_sigma=cfg.learn_sigma,
    )[: len(labels)]  # [N + pad, C, H, W] -> [N, C, H, W]
    return decode(x) if decode else to_uint8(x).cpu()
