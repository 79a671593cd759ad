"""`kind-dit`: the command line on top of the library.

kind-dit train      pre-train a KIND (or dense) DiT
kind-dit sample     images from a run, a parts directory or an assembled model
kind-dit info       parameter counts and bytes per part
kind-dit decompose  a run -> learngene + tailor files
kind-dit assemble   parts -> a model for some classes (or one class merged dense)
kind-dit transfer   parts -> a model for new classes, trained from the learngenes
kind-dit graft      parts + a KIND transfer run -> parts that also hold its new classes
kind-dit evaluate   FID, precision, recall, class accuracy of a samples .npz
kind-dit demo       the end-to-end demo: pre-train, decompose, transfer, evaluate, report
kind-dit encode     images -> a latent store, with a local VAE
kind-dit import     public DiT weights (official .pt or diffusers folder) -> a dense model
kind-dit export     a dense or merged model -> a diffusers DiT folder
kind-dit serve      a parts directory over HTTP: learngene once, tailors on demand, mixed batches

Each command is a module of this package with NAME, HELP, DESCRIPTION, add_arguments(parser)
and run(args); COMMANDS lists them in --help order, RANKED those that spread their work over
the ranks of a torchrun job (the others refuse to run under one). Command modules import the
library only inside run(), so building the parser (and `kind-dit --help`) stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kind.cli import (
    assemble,
    decompose,
    demo,
    encode,
    evaluate,
    export,
    graft,
    import_,
    info,
    sample,
    serve,
    train,
    transfer,
)
from kind.cli.common import HelpFormatter
from kind.core.host_memory import keep_freed_memory

COMMANDS = (
    train,
    sample,
    info,
    decompose,
    assemble,
    transfer,
    graft,
    evaluate,
    demo,
    encode,
    import_,
    export,
    serve,
)
RANKED = (train, transfer, sample, encode)


def build_parser() -> argparse.ArgumentParser:
    """The parser with one subcommand per entry of COMMANDS; each sets `func` to its run()."""
    parser = argparse.ArgumentParser(
        prog="kind-dit",
        description="KIND: decomposable Diffusion Transformers (learngenes and "
        "tailors): pre-train, decompose, recombine, transfer.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(
            command.NAME,
            help=command.HELP,
            description=command.DESCRIPTION,
            formatter_class=HelpFormatter,
        )
        command.add_arguments(p)
        p.set_defaults(func=command.run, ranked=command in RANKED)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run one command; the library's user-facing errors print as one line and exit 2. Any other
    exception is input the library does not check yet (or a bug): one line that says so and
    how to see more, exit 1. --verbose re-raises both with the traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    keep_freed_memory()  # every command's CPU work: no page faults to refill the heap
    code = 0
    try:
        if not args.ranked:
            _one_process(args.command)
        args.func(args)
    # the library's user errors (an ImportError: an optional extra that is not installed)
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except Exception as e:  # the last line of defence: no traceback for unchecked input
        if args.verbose:
            raise
        print(
            f"error: kind-dit {args.command} stopped on {type(e).__name__}: {e}. An input it does "
            "not check yet, most likely a damaged or hand-edited file among those it read; run "
            "it again with -v for the traceback, and please report it",
            file=sys.stderr,
        )
        code = 1
    if args.ranked:
        _end_rank(code)
    if code:
        sys.exit(code)


def _end_rank(code: int) -> None:
    """End a torchrun rank without the interpreter's teardown: its process group destroyed and
    its output flushed, then `os._exit`. Even with the group destroyed first
    (`kind.core.distributed.shutdown`), a rank now and then died with SIGABRT at exit
    ("terminate called without an active exception", once in a few dozen two-rank runs here),
    which torchrun reports as a failed job (and restarts, with --max-restarts) after work that
    succeeded; skipping the teardown (C++ static destructors and the threads they join) leaves
    nothing to fail. A process that joined no group (no torchrun) exits as usual."""
    import torch.distributed as dist

    from kind.core.distributed import shutdown

    if not (dist.is_available() and dist.is_initialized()):
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    shutdown()
    os._exit(code)


def _one_process(command: str) -> None:
    """Refuse a command that does not spread over ranks when torchrun started several: each rank
    would do the whole job, and all but one would find its output written by another."""
    from kind.core.distributed import launched_world

    if (world := launched_world()) > 1:
        ranked = ", ".join(c.NAME for c in RANKED)
        raise ValueError(
            f"kind-dit {command} runs as one process, not under torchrun ({world} ranks); "
            f"run it without torchrun (only {ranked} spread over ranks)"
        )


if __name__ == "__main__":
    main()
