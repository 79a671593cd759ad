"""`kind-dit import`: public DiT weights -> a dense kind-dit model directory."""

from __future__ import annotations

import argparse

NAME = "import"
HELP = "turn public DiT weights into a kind-dit model directory"
DESCRIPTION = (
    "SRC is an official DiT checkpoint (a facebookresearch/DiT .pt state dict such as "
    "DiT-XL-2-256x256.pt, or a checkpoint of its train.py, whose EMA weights are taken; read "
    "with torch.load(weights_only=True)) or a diffusers DiTTransformer2DModel folder "
    "(config.json + diffusion_pytorch_model.safetensors, or a DiTPipeline folder with "
    "transformer/; older diffusers' DiT folders, saved as Transformer2DModel, too). Size, "
    "input size, channels, learned sigma and class count come from the weights; the result is a "
    "dense model directory with DiT's diffusion (epsilon prediction, linear schedule, 1,000 "
    "steps) and the weights' licence note (NOTICE; the official DiT weights are CC BY-NC 4.0). "
    "Outputs equal DiT's to fp32 rounding."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The weights, where the model goes, and what the weights do not say."""
    p.add_argument("src", help="official DiT .pt file, or a diffusers DiT folder")
    p.add_argument("--out", required=True, help="model directory to create (new or empty)")
    p.add_argument(
        "--class-names",
        metavar="FILE",
        help="class names, one a line in label order (default: 0, 1, 2, ...)",
    )
    p.add_argument(
        "--vae",
        metavar="DIR",
        help="the SD VAE directory a latent model's samples decode with, recorded in the model "
        "(default: none recorded; give `kind-dit sample --vae`)",
    )


def run(args: argparse.Namespace) -> None:
    """Write the model directory; print what the user should know about it."""
    from kind.store.interop import import_dit

    out, notes = import_dit(args.src, args.out, class_names=args.class_names, vae=args.vae)
    for note in notes:
        print(f"note: {note}")
    print(f"model -> {out}")
