"""What several commands share: the training options of `train` and `transfer`, and how they
become a run config."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from kind.core.seeds import SEED_MAX

if TYPE_CHECKING:
    from kind.training.config import Config

SET_HELP = (
    "override a config value, e.g. --set train.lr=3e-4 (repeatable; sections: model, "
    "diffusion, train, sample, and the top-level keys data, group_file and vae: the VAE "
    "of a latent store, where it is not at the path the store records)"
)

# command-line flag (argparse dest) -> key of the config's train section
_TRAIN_FLAGS = ("steps", "batch_size", "lr", "seed", "device", "precision")


class HelpFormatter(argparse.HelpFormatter):
    """Every command's help: an option's default appended where its help does not state one.
    argparse's ArgumentDefaultsHelpFormatter would append "(default: None)" to the options whose
    default is "unset" as well, which says nothing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == []
        shown = action.option_strings and not unset and action.default is not argparse.SUPPRESS
        if shown and "default" not in text.lower():
            text += " (default: %(default)s)"
        return text


def count(low: int = 1, high: int | None = None):
    """An argparse type: an integer >= `low` (and <= `high`), refused at parse time with the
    range."""
    wanted = f">= {low}" if high is None else f"from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer {wanted}, got {text!r}"
            ) from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {wanted}, got {value}")
        return value

    return parse


def number(low: float = 0.0, open_low: bool = False):
    """An argparse type: a finite number >= `low` (> with `open_low`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (open_low and value == low):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'>' if open_low else '>='} {low:g}, got {text}"
            )
        return value

    return parse


def classes(text: str | None, option: str = "--classes") -> list[str] | None:
    """A comma list as names; None (not []) when the option was not given, meaning "all"."""
    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise ValueError(f"{option} {text!r} names nothing; give comma-separated names")
    return names


def add_train_options(p: argparse.ArgumentParser) -> None:
    """The options every training command takes, so `train` and `transfer` read alike."""
    p.add_argument(
        "--config",
        help="YAML/JSON config file (sections model, diffusion, train, sample; top-level "
        "keys data, group_file, vae); command-line options override it",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument(
        "--data",
        help="data spec: mnist:0-5, mnist:6,7,8,9, animals, path/to/folder[:cat,dog], or a latent "
        "store (kind-dit encode)",
    )
    p.add_argument("--steps", type=count(), help="optimiser steps (train.steps)")
    p.add_argument("--batch-size", type=count(), help="global batch size (train.batch_size)")
    p.add_argument("--lr", type=number(open_low=True), help="peak learning rate (train.lr)")
    p.add_argument(
        "--seed", type=count(0, SEED_MAX), help="seed for init, batches and noise (train.seed)"
    )
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (train.device)")
    p.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], help="autocast precision (train.precision)"
    )
    p.add_argument(
        "--out",
        required=True,
        help="run directory: new or empty (a run already in it needs --resume, --restart or "
        "--auto-resume)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="start the run in --out again from nothing (removes that run's own files only)",
    )
    p.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint if it has one, else start it "
        "(for jobs started again as they were: torchrun --max-restarts, a requeued batch job)",
    )


def overrides(args: argparse.Namespace) -> dict:
    """--set pairs plus the shortcut flags as one override dict; a flag beats a --set of its key."""
    from kind.training.config import parse_overrides

    ov = parse_overrides(args.set)
    for section in ("train", "model"):  # the flags below set keys inside these sections
        if not isinstance(ov.get(section, {}), dict):
            raise ValueError(
                f"--set {section}={ov[section]!r} replaces a whole section; set its keys: "
                f"--set {section}.KEY=VALUE"
            )
    for key in _TRAIN_FLAGS:
        if getattr(args, key, None) is not None:
            ov.setdefault("train", {})[key] = getattr(args, key)
    if getattr(args, "data", None) is not None:
        ov["data"] = args.data
    if getattr(args, "model", None):
        ov.setdefault("model", {})["kind"] = args.model == "kind"
    if getattr(args, "size", None):
        ov.setdefault("model", {})["size"] = args.size
    if getattr(args, "init_from", None):
        ov.setdefault("train", {})["init_from"] = args.init_from
    return ov


def settle_resume(args: argparse.Namespace) -> None:
    """Turn --auto-resume into --resume, --restart or neither, from what --out holds, so the
    same command line serves a job's first start and every restart."""
    if not args.auto_resume:
        return
    if args.resume or args.restart:
        raise ValueError("--auto-resume chooses between --resume and starting; pass it alone")
    from kind.store.runs import auto_resume

    args.resume, args.restart = auto_resume(Path(args.out))


def _refuse_unused_budget(args: argparse.Namespace) -> None:
    """A transfer's budget options where they would be accepted and then ignored, refused before
    anything is read: --budget with --match-kind (the run would take one and drop the other),
    and either for a baseline that no budget sizes. (`train` has neither option.)"""
    budget, match = getattr(args, "budget", None), getattr(args, "match_kind", None)
    if budget is not None and match:
        raise ValueError(
            f"--budget {budget} and --match-kind {match} each set the budget; pass one of them"
        )
    if budget is not None or match:
        from kind.transfer.registry import check_budget

        check_budget(args.method, "--budget" if budget is not None else "--match-kind")


def run_config(args: argparse.Namespace) -> Config:
    """The run's config: on --resume the saved one with overrides, else defaults + file + flags.
    Every training command's options pass through here first, so options the run would ignore
    are refused here (`_refuse_unused_budget`).

    A resumed run may change how it trains, never what it is: model, diffusion and data are fixed.
    """
    from kind.io import read_json
    from kind.training.config import load_config

    _refuse_unused_budget(args)
    saved = Path(args.out) / "config.json"
    if args.resume and saved.is_file():
        base = read_json(saved)
        cfg = load_config(args.config, overrides(args), base=base)
        before = load_config(base=base)
        for section in ("model", "diffusion", "data"):
            if getattr(cfg, section) != getattr(before, section):
                raise ValueError(
                    f"--resume cannot change {section}; it is fixed by the run in {args.out}"
                )
        return cfg
    cfg = load_config(args.config, overrides(args))
    given = [k for k in ("class_names", "class_to_group", "groups") if getattr(cfg.model, k)]
    if given:  # a new run takes them from its data and group_file: a value here is ignored
        raise ValueError(
            f"model.{' and model.'.join(given)} {'come' if len(given) > 1 else 'comes'} from "
            "the data (--data) and group_file (a YAML/JSON file {class name: group}); leave "
            "them out of --set and --config"
        )
    return cfg
