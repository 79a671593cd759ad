"""`kind-dit export`: a dense (or merged) model -> a diffusers DiT folder."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "write a dense or merged model as a diffusers DiT folder"
DESCRIPTION = (
    "Write MODEL (a dense run or model directory, or a class merged by `assemble --merge`) as "
    "a diffusers DiTTransformer2DModel folder: config.json + "
    "diffusion_pytorch_model.safetensors, loadable with DiTTransformer2DModel.from_pretrained"
    "(OUT); a merged model's unconditional network goes to OUT/unconditional. kind_dit.json "
    "records the class names, the diffusion and scheduler settings and the licence. A KIND "
    "model (class-gated tailors) has no diffusers counterpart: merge a class first."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The model, the format and where it goes."""
    p.add_argument("source", help="dense run or model directory, or a merged model directory")
    p.add_argument("--out", required=True, help="folder to create (new or empty)")
    p.add_argument(
        "--format", choices=["diffusers"], default="diffusers", help="output format (diffusers)"
    )


def run(args: argparse.Namespace) -> None:
    """Write the folder; print what the user should know about it."""
    from kind.store.interop import export_diffusers

    out, notes = export_diffusers(args.source, args.out)
    for note in notes:
        print(f"note: {note}")
    print(f"{args.format} folder -> {out}")
