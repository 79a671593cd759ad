"""`kind-dit assemble`: parts -> a model for some classes (or one class merged dense)."""

from __future__ import annotations

import argparse

from kind.cli.common import classes, count, number

NAME = "assemble"
HELP = "build a model for some classes from parts"
DESCRIPTION = (
    "Learngenes + the tailors of --classes -> a model directory "
    "that computes exactly the full model's outputs for those classes. With "
    "--merge CLASS, one class folded into a dense DiT (plus the learngene-only "
    "network for guidance); --merge null gives the unconditional dense model. "
    "--max-params N (or --max-gflops G) drops the lowest-|σ| learngene components until the "
    "model fits N parameters (G GFLOPs a forward pass of one sample)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The parts, which classes to keep, and whether to fold one into dense weights."""
    p.add_argument("parts", help="parts directory")
    p.add_argument(
        "--classes",
        help="comma-separated class names, or class ids where no name is a number (default: all)",
    )
    p.add_argument(
        "--merge", metavar="CLASS|null", help="fold one class (or null) into dense weights"
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--max-params",
        type=count(0),
        metavar="N",
        help="parameter budget: drop learngene components until the model has ≤ N parameters. "
        "Globally across all decomposed layers, components are ranked by |σ_i| alone (smallest "
        "first); each dropped one saves (in + out + 1) parameters of its layer; every layer "
        "keeps at least one. Refused before writing when one component per layer exceeds N",
    )
    budget.add_argument(
        "--max-gflops",
        type=number(),
        metavar="G",
        help="compute budget, the same rule as --max-params with each component's cost in FLOPs: "
        "drop learngene components until one forward pass of one sample (of a kept class, at "
        "the model's image size) costs ≤ G GFLOPs. Counted per layer as the layer computes it "
        "(2 FLOPs a multiply-add; matrix products, patch convolution and attention, as "
        "torch.utils.flop_counter counts; kind.store.parts.FLOP_RULE). Refused before writing "
        "when one component per layer exceeds G",
    )
    p.add_argument("--out", required=True, help="model directory to create")


def run(args: argparse.Namespace) -> None:
    """Write the assembled (or merged) model directory."""
    from kind.store.parts import assemble

    merge_null = args.merge == "null"
    merge_class = None if merge_null else args.merge
    out = assemble(
        args.parts,
        classes(args.classes),
        args.out,
        merge_class=merge_class,
        merge_null=merge_null,
        max_params=args.max_params,
        max_gflops=args.max_gflops,
    )
    print(f"model -> {out}")
