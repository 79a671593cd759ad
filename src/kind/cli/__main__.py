"""`python -m kind.cli` (what torchrun launches): the `kind-dit` command line."""

from kind.cli.main import main

main()
