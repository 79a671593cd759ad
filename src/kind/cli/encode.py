"""`kind-dit encode`: images -> a latent store, with a local VAE."""

from __future__ import annotations

import argparse

from kind.cli.common import count
from kind.data.images import MAX_IMAGE_SIZE

NAME = "encode"
HELP = "encode images into a latent store with a local VAE"
DESCRIPTION = (
    "Encode the images of a data spec (and their mirror images) "
    "with a local Stable Diffusion VAE into a memory-mapped latent store; "
    "train on it with --data STORE. Under torchrun each rank encodes a share of the images "
    "into the one store (every node must see --out's parent directory). An encode that stops "
    "keeps the rows it wrote; --resume continues it."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The images, the VAE, the store to write, and how fast to encode."""
    p.add_argument(
        "--data",
        required=True,
        help="data spec, e.g. /data/imagenet/train or /data/imagenet/train:n01440764,n01443537",
    )
    p.add_argument("--vae", required=True, help="local VAE directory (sd-vae-ft-ema layout)")
    p.add_argument("--out", required=True, help="store directory to create")
    p.add_argument(
        "--image-size", type=count(1, MAX_IMAGE_SIZE), default=256, help="pixels (default 256)"
    )
    p.add_argument(
        "--split",
        choices=["train", "test"],
        default="train",
        help="which split of the spec (every 5th image of a class is test)",
    )
    p.add_argument("--batch-size", type=count(), default=64, help="images per VAE batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="VAE compute precision"
    )
    p.add_argument("--workers", type=count(0), default=4, help="image-reading threads")
    p.add_argument("--limit-per-class", type=count(), help="encode at most N images a class")
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the encode into --out that stopped (a killed job, an unreadable image "
        "since replaced): the same command otherwise, the rows it wrote are kept",
    )
    again.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue a stopped encode into --out if there is one, else start; a store this "
        "encode finished already is left as it is (for jobs a scheduler may requeue)",
    )


def run(args: argparse.Namespace) -> None:
    """Encode into a new store (shared over the ranks under torchrun) and say how to train on it."""
    from kind.core import distributed
    from kind.data.encoding import encode_to_store

    info = distributed.setup(args.device)
    out = encode_to_store(
        args.data,
        args.out,
        args.vae,
        args.image_size,
        split=args.split,
        batch_size=args.batch_size,
        device=info.device,
        dtype=args.dtype,
        workers=args.workers,
        limit_per_class=args.limit_per_class,
        resume="auto" if args.auto_resume else args.resume,
        info=info if info.world > 1 else None,
    )
    if info.is_main:
        print(f"latent store -> {out}  (train on it with --data {out})")
