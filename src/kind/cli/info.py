"""`kind-dit info`: parameter counts and bytes per part."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "info"
HELP = "parameter counts and bytes per part"
DESCRIPTION = (
    "Size table: learngenes, each tailor, assembled variants, and "
    "the dense model of the same size, for a run, model or parts directory."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Just the directory to measure."""
    p.add_argument("source", help="run, parts or model directory")


def print_sizes(source: str | Path) -> None:
    """The size table of `source`; `decompose` prints it too, for the parts it wrote."""
    from kind.store.sizes import size_table

    rows = size_table(Path(source))
    width = max(len(r[0]) for r in rows)
    print(f"{'part':<{width}}  {'parameters':>12}  {'bytes':>12}")
    for name, params, size in rows:
        size_text = f"{size:>12,}" if size is not None else f"{'-':>12}"
        print(f"{name:<{width}}  {params:>12,}  {size_text}")


def run(args: argparse.Namespace) -> None:
    """Print the size table of the source."""
    print_sizes(args.source)
