"""`kind-dit graft`: parts + a KIND transfer run -> parts that also hold the run's new classes."""

from __future__ import annotations

import argparse

from kind.cli.info import print_sizes

NAME = "graft"
HELP = "add a KIND transfer run's new classes to a parts directory"
DESCRIPTION = (
    "Write a new parts directory holding PARTS's learngene and tailors plus the tailors and "
    "label rows of the new classes of RUN, a finished KIND transfer from PARTS with its "
    "learngenes frozen; `assemble` and `sample` then serve old and new classes from one "
    "learngene. Refused, before anything is written, when RUN's learngene is not PARTS's bit "
    "for bit (--train-learngenes, kind-sigma, kind-unfrozen, other parts), when a class name "
    "of RUN is already in PARTS, when RUN is no KIND transfer (dense, a baseline), when its "
    "model or tailor rank differs from PARTS's, or when either side has a null tailor. PARTS "
    "and RUN are never touched."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The parts, the transfer run whose classes join them, and where the new parts go."""
    p.add_argument(
        "parts",
        metavar="PARTS",
        help="parts directory (kind-dit decompose) the run transferred from",
    )
    p.add_argument(
        "run", metavar="RUN", help="run directory of a finished `kind-dit transfer PARTS` (KIND)"
    )
    p.add_argument("--out", required=True, help="parts directory to create (new or empty)")


def run(args: argparse.Namespace) -> None:
    """Write the grafted parts, then size them."""
    from kind.store.graft import graft

    out = graft(args.parts, args.run, args.out)
    print(f"parts -> {out}")
    print_sizes(out)
