"""`kind-dit decompose`: a run -> learngene + tailor files."""

from __future__ import annotations

import argparse
from pathlib import Path

from kind.cli.info import print_sizes

NAME = "decompose"
HELP = "split a KIND run into learngene and tailor files"
DESCRIPTION = (
    "Write a parts directory: learngene.safetensors, one "
    "tailor_NNNN.safetensors per tailor group, and manifest.json (config, "
    "classes, tau, per-file parameters, bytes and sha256)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The KIND model to split and where its parts go."""
    p.add_argument("source", help="KIND run or model directory")
    p.add_argument("--out", required=True, help="parts directory to create")


def run(args: argparse.Namespace) -> None:
    """Write the parts, keeping the source's sampling defaults and latent VAE, then size them."""
    from kind.store.load import load_model
    from kind.store.parts import decompose

    model, diffusion, meta = load_model(Path(args.source))
    extra = {k: meta.get(k) for k in ("sample", "latent")}
    out = decompose(
        model, diffusion, args.out, extra | {"source": str(Path(args.source).resolve())}
    )
    print(f"parts -> {out}")
    print_sizes(out)
