"""`kind-dit transfer`: parts -> a model for new classes, trained from the learngenes.

The --method names and their help come from kind.transfer.registry, the one table of methods. It
imports torch and peft (about 10 s), so this module reads it only when --method is given or the
help is shown, never while the parser is built: `kind-dit --help` stays instant.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from kind.cli.common import (
    HelpFormatter,
    add_train_options,
    count,
    number,
    run_config,
    settle_resume,
)

NAME = "transfer"
HELP = "train a model for new classes from the learngenes"
DESCRIPTION = (
    "Start from the learngenes of PARTS with fresh, randomly "
    "initialised tailors and label rows for the classes of --data, learngenes "
    "frozen unless --train-learngenes, and train with the usual loop; or, with a baseline "
    "--method, adapt a dense run or model directory (or fine-tune it, or train from scratch)."
)
METHOD_HELP = "how to transfer (default kind). "


class _Methods:
    """--method's choices: the registry's names, looked up on first use."""

    def __contains__(self, name: object) -> bool:
        from kind.transfer.registry import METHODS

        return name in METHODS

    def __iter__(self) -> Iterator[str]:
        from kind.transfer.registry import METHODS

        return iter(METHODS)


class _Formatter(HelpFormatter):
    """Appends the registry's one line per method to --method's help, when help is printed."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if action.dest == "method" and text:
            from kind.transfer.registry import help_text

            text += help_text().replace("%", "%%")
        return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The source, the shared training options, and what only a transfer chooses."""
    p.add_argument(
        "source",
        help="parts directory of a KIND model (the KIND methods: kind, kind-sigma, "
        "kind-tailors, kind-unfrozen) "
        "or run/model directory of a dense DiT (the baselines)",
    )
    add_train_options(p)
    p.add_argument(
        "--method",
        default="kind",
        choices=_Methods(),
        metavar="METHOD",  # a metavar keeps usage lines from listing (importing) the choices
        help=METHOD_HELP,
    )
    p.add_argument(
        "--budget",
        type=count(),
        help="trainable-parameter budget the LoRA/PiSSA/OFT rank is matched to (default: none, "
        "each method's own default rank or block size)",
    )
    p.add_argument(
        "--match-kind",
        metavar="PARTS|RUN",
        help="set --budget to what a KIND transfer to the same classes trains: the KIND transfer "
        "run RUN (as it ran: with --null-tailor, --rank-tailor or a group file), or one from "
        "PARTS with the defaults",
    )
    p.add_argument(
        "--train-learngenes",
        action="store_true",
        help="train the learngenes too instead of freezing them",
    )
    p.add_argument(
        "--null-tailor",
        action="store_true",
        help="give the null class a fresh tailor of its own (KIND methods), trained through label "
        "dropout, so the unconditional model of guidance is the target domain's",
    )
    p.add_argument(
        "--rank-tailor",
        type=number(open_low=True),
        help="tailor rank of the new model (KIND methods; default: the source's)",
    )
    # Last: Python >= 3.14 expands each help string with this formatter as it is added.
    p.formatter_class = _Formatter


def run(args: argparse.Namespace) -> None:
    """Transfer into --out; --match-kind first sizes the budget from a KIND transfer's."""
    from kind.data.dataset import class_names
    from kind.training.config import Config, check_rank
    from kind.transfer.run import run_transfer

    settle_resume(args)
    if args.rank_tailor is not None:
        check_rank("--rank-tailor", args.rank_tailor)
    if args.data is None and not args.resume and not _config_sets_data(args.config):
        raise ValueError(
            "give the target classes: --data SPEC, or a --config that sets data (a transfer "
            "has no default data)"
        )
    cfg = run_config(args)
    fixed = [s for s in ("model", "diffusion") if getattr(cfg, s) != getattr(Config(), s)]
    if fixed and not args.resume:  # (a resumed run's config is its own: run_config checks it)
        raise ValueError(
            f"a transfer takes its {' and '.join(fixed)} settings from SOURCE; leave them out "
            "of --set and --config (the tailors' rank is --rank-tailor)"
        )
    budget = args.budget
    if args.match_kind:
        budget = _matched_budget(Path(args.match_kind), class_names(cfg.data))
    result = run_transfer(
        args.source,
        cfg,
        args.out,
        method=args.method,
        train_learngenes=args.train_learngenes,
        budget=budget,
        rank_tailor=args.rank_tailor,
        null_tailor=args.null_tailor,
        resume=args.resume,
        restart=args.restart,
    )
    if result.is_main:  # under torchrun rank 0 reports
        print(f"run: {result.run_dir}  ({result.steps} steps in {result.seconds:.0f} s)")


def _config_sets_data(path: str | None) -> bool:
    """Whether the config file at `path` names the data (configs/domain-shift/*.yaml do)."""
    from kind.training.config import load_config

    unset = "<none given>"
    return path is not None and load_config(path, base={"data": unset}).data != unset


def _matched_budget(kind: Path, classes: list[str]) -> int:
    """The trainable parameters of the KIND transfer `kind` (a run) to `classes`, or of one
    from `kind` (parts) with the defaults: the source's tailor rank, no null tailor, a group a
    class. A run's own count is what a baseline must match when the KIND run used options a
    baseline cannot take (a null tailor adds a tailor: twice the budget for one class)."""
    from kind.data.dataset import class_names
    from kind.io import read_json
    from kind.store.runs import CONFIG_JSON, is_run_dir, read_run_record
    from kind.transfer.kind import kind_budget
    from kind.transfer.registry import get

    if not is_run_dir(kind):
        return kind_budget(kind, classes)
    record = read_run_record(kind).get("transfer") or {}
    if "trainable_params" not in record or not get(record.get("method", "")).is_kind:
        raise ValueError(
            f"--match-kind {kind} is not a KIND transfer run; give one, or the parts it "
            "transferred from"
        )
    data = read_json(kind / CONFIG_JSON, "data")["data"]
    if not isinstance(data, str):
        raise ValueError(f"{kind / CONFIG_JSON}: data is {data!r:.60}, not a data spec; the file "
                         "is damaged or was edited by hand")  # fmt: skip
    theirs = class_names(data)
    if theirs != classes:
        raise ValueError(
            f"--match-kind {kind} transferred to the classes {theirs}, this transfer to "
            f"{classes}; match a KIND run to the same classes"
        )
    return int(record["trainable_params"])
