"""`kind-dit demo`: the end-to-end demo: pre-train, decompose, transfer, evaluate, report."""

from __future__ import annotations

import argparse

from kind.cli.common import classes, count
from kind.experiments.presets import PRESETS, Preset

NAME = "demo"
HELP = "the end-to-end demo: pre-train, decompose, transfer, evaluate, report"
DESCRIPTION = (
    "Every stage of KIND on the bundled data "
    "against the baselines; writes OUT/report.md. Re-running with the same "
    "--out continues where it stopped."
)


# how long each preset takes: measured, not derivable from the preset (BENCHMARKS.md)
DURATION = {
    "quick": "toy sizes, about 3 minutes on 2 cores",
    "default": "25-90 minutes on 2 cores",
    "paper": "a few hours on 2 cores",
}


def _names(names: tuple) -> str:
    """Names or numbers as a list to read: 1.25, not 1.25000."""
    return ", ".join(f"{n:g}" if isinstance(n, float) else str(n) for n in names)


def describe(preset: Preset) -> str:
    """What a preset runs, read from the preset itself so that --help cannot drift from it."""
    seeded = preset.methods if preset.seeded_methods is None else preset.seeded_methods
    many = () if len(preset.seeds) == 1 else tuple(m for m in preset.methods if m in seeded)
    one = tuple(m for m in preset.methods if m not in many)
    parts = [f"source{'s' * (len(preset.sources) > 1)} {_names(preset.sources)}"]
    if many:
        parts.append(f"{_names(many)} with seeds {_names(preset.seeds)}")
    if one:
        parts.append(f"{_names(one)} with seed {preset.seeds[0]}")
    if preset.null_methods:
        parts.append(f"{_names(preset.null_methods)} also with a null tailor")
    if preset.cfg_scales:
        parts.append(f"guidance sweep {_names(preset.cfg_scales)}")
    if preset.budget_scales:
        scales = ", ".join(f"{x:g}x" for x in preset.budget_scales)
        parts.append(f"budget curves of {_names(preset.budget_methods)} at {scales} KIND's budget")
    if preset.kindify_steps:
        parts.append("KIND-ify vs KIND from scratch")
    if preset.size_fractions:
        parts.append("FID against size")
    return "; ".join(parts)


def _preset_help() -> str:
    """Each preset's duration and what it runs; presets that run the same share one line."""
    by_runs: dict[str, list[str]] = {}
    for name, preset in PRESETS.items():
        by_runs.setdefault(describe(preset), []).append(name)
    durations = "; ".join(f"{name}: {DURATION[name]}" for name in PRESETS)
    runs = ". ".join(f"{' and '.join(names)}: {runs}" for runs, names in by_runs.items())
    return f"{durations}. What they run: {runs}"


def _methods_help() -> str:
    """Exactly what --methods replaces: the preset's methods list, which decides the transfers at
    KIND's budget and their null-tailor variants, but not the budget curves or the KIND-ify
    comparison (each has its own list)."""
    seeded = "; ".join(f"{name}: {_names(p.seeded_methods)}" for name, p in PRESETS.items()
                       if p.seeded_methods is not None and len(p.seeds) > 1)  # fmt: skip
    curves = "; ".join(f"{name}: {_names(p.budget_methods)}" for name, p in PRESETS.items()
                       if p.budget_scales)  # fmt: skip
    return (
        "comma-separated transfer methods (the names of transfer --method, from the same "
        "registry) instead of the preset's list of methods run at KIND's budget; those of them "
        f"the preset runs with all its seeds ({seeded}) get them, the others its first seed, and "
        "a preset's null-tailor variant runs only for a method in the list. It does not change "
        f"the budget curves ({curves}) nor the KIND-ify comparison's KIND transfers, which run as "
        "the preset says"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Which preset, where, and how many jobs side by side."""
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="default",
        help=_preset_help(),
    )
    p.add_argument(
        "--out",
        help="output directory (default runs/demo; runs/demo-PRESET for another preset, so "
        "that a preset tried first does not stand in the way of another)",
    )
    p.add_argument(
        "--jobs",
        type=count(),
        help="jobs side by side (default: one a core, at most 4; 1 on a GPU)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--methods",
        help=_methods_help(),
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write report.md from the jobs finished so far, run nothing",
    )


def run(args: argparse.Namespace) -> None:
    """Run (or continue) the demo and say where its report is."""
    from kind.experiments.demo import run_demo

    default = "runs/demo" if args.preset == "default" else f"runs/demo-{args.preset}"
    report = run_demo(
        args.out or default,
        args.preset,
        jobs=args.jobs,
        device=args.device,
        methods=classes(args.methods, "--methods"),
        report_only=args.report_only,
    )
    print(f"report: {report}")
