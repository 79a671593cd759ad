"""Floating-point operations of one training image and one forward pass, counted by
`torch.utils.flop_counter` on this code (no timing): the figure docs/scale.md turns into GPU-hour
estimates.

    python benchmarks/count_flops.py                          # DiT-B/2, 32x32x4 latents, 150 classes
    python benchmarks/count_flops.py --size DiT-L/2 --rank-tailor 1
"""

from __future__ import annotations

import argparse

import torch

from kind.core.diffusion import Diffusion, DiffusionConfig
from kind.core.flops import count_flops
from kind.core.model import DiT, ModelConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="DiT-B/2")
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--rank-tailor", type=float, default=2)
    ap.add_argument(
        "--batch-size", type=int, default=2, help="images counted (result is per image)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = [f"c{i}" for i in range(args.classes)]
    for kind in (False, True):
        model = DiT(ModelConfig(size=args.size, kind=kind, image_size=32, in_channels=4,
                                learn_sigma=True, class_names=names, rank_tailor=args.rank_tailor))  # fmt: skip
        n = args.batch_size
        x, y, t = torch.randn(n, 4, 32, 32), torch.arange(n) % args.classes, torch.arange(n) * 400
        with count_flops() as train:
            Diffusion(DiffusionConfig()).loss(model, x, y, t, torch.randn_like(x), model.route(y)).mean().backward()  # fmt: skip
        with count_flops() as forward, torch.no_grad():
            model(x, t, y, model.route(y))
        print(f"{args.size} {'KIND' if kind else 'dense'}: {train.get_total_flops() / n / 1e9:.1f} "
              f"GFLOP a training image, {forward.get_total_flops() / n / 1e9:.1f} GFLOP a forward "
              f"pass (batch {n})")  # fmt: skip


if __name__ == "__main__":
    main()
