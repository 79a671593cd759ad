"""`kind-dit train`: pre-train a KIND (or dense) DiT."""

from __future__ import annotations

import argparse
import logging

from kind.cli.common import add_train_options, run_config, settle_resume

NAME = "train"
HELP = "pre-train a KIND or dense DiT"
DESCRIPTION = (
    "Pre-train a class-conditional DiT (KIND by default) on a data "
    "spec; writes checkpoints, sample grids, metrics.csv and the EMA model."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The shared training options plus what only pre-training chooses: the architecture."""
    add_train_options(p)
    p.add_argument(
        "--model",
        choices=["kind", "dense"],
        help="KIND gated SVD layers or plain dense linears (model.kind)",
    )
    p.add_argument(
        "--size",
        help="model size: tiny, mini (patch 7 for 28x28), tiny/4, mini/2, "
        "DiT-S/2 ... DiT-XL/8 (model.size)",
    )
    p.add_argument(
        "--init-from",
        metavar="DENSE",
        help="start a KIND model from a dense DiT (run or model directory, e.g. one made by "
        "`kind-dit import`): learngenes = the leading SVD triples of its weights, its other "
        "weights and label rows copied, tailors fresh (train.init_from)",
    )


def run(args: argparse.Namespace) -> None:
    """Train (or resume) into --out and say where the model and samples went."""
    from kind.training.loop import train

    settle_resume(args)
    cfg = run_config(args)
    result = train(cfg, args.out, resume=args.resume, restart=args.restart)
    if not result.is_main:  # under torchrun rank 0 reports
        return
    logging.info("trained %d steps in %.0f s -> %s", result.steps, result.seconds, result.run_dir)
    print(
        f"run: {result.run_dir}  (model: {result.run_dir / 'model'}, samples: "
        f"{result.run_dir / 'samples'})"
    )
