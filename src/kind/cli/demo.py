"""`kind-dit demo`: the end-to-end demo: pre-train, decompose, transfer, evaluate, report."""

from __future__ import annotations

import argparse

from kind.cli.common import classes, count

NAME = "demo"
HELP = "the end-to-end demo: pre-train, decompose, transfer, evaluate, report"
DESCRIPTION = (
    "Every stage of KIND on the bundled data "
    "against the baselines; writes OUT/report.md. Re-running with the same "
    "--out continues where it stopped."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Which preset, where, and how many jobs side by side."""
    p.add_argument(
        "--preset",
        choices=["quick", "default", "paper"],
        default="default",
        help="quick: toy sizes (minutes); default: KIND, its ablation, LoRA and full "
        "fine-tuning (about half an hour on 2 cores); paper: every baseline, 3 seeds",
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument(
        "--jobs",
        type=count(),
        help="jobs side by side (default: one a core, at most 4; 1 on a GPU)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--methods",
        help="comma-separated transfer methods instead of the preset's (the names of "
        "transfer --method, from the same registry)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write report.md from the jobs finished so far, run nothing",
    )


def run(args: argparse.Namespace) -> None:
    """Run (or continue) the demo and say where its report is."""
    from kind.experiments.demo import run_demo

    report = run_demo(
        args.out,
        args.preset,
        jobs=args.jobs,
        device=args.device,
        methods=classes(args.methods, "--methods"),
        report_only=args.report_only,
    )
    print(f"report: {report}")
