"""`kind-dit demo`: every stage of KIND on the bundled data, against the methods people would use
instead, in one command.

1. pre-train a KIND DiT and a dense DiT of the same size on mnist:0-5;
2. decompose KIND; assemble it for one, two and all classes; check that the assembled and merged
   models compute the full model's outputs; measure their sizes;
3. transfer to novel classes (mnist:6-9) and across a domain shift (animal silhouettes) with KIND
   and the baselines at KIND's budget of trainable parameters;
4. evaluate every model on the test split (FID, precision, recall and class accuracy in the feature
   space of a classifier trained on that dataset), also along training for FID-against-steps curves;
5. write report.md with the tables, sample grids and plots.

Independent jobs run side by side in worker processes (one CPU thread each by default, which is
what a 2-core laptop runs best); each job writes its result when it finishes, and re-running the
demo with the same --out skips finished jobs, so an interrupted demo continues.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from kind.experiments.jobs import deploy_task, pretrain_task, transfer_task
from kind.experiments.presets import PRESETS, TASKS, Preset
from kind.experiments.report import write_report
from kind.experiments.scheduler import Job, execute
from kind.transfer.registry import get

log = logging.getLogger(__name__)


def plan(out: Path, preset: Preset, threads: int, device: str) -> list[Job]:
    """Pre-training, deployment, then every (seed, task, method) transfer, seed-major, so an
    interrupted run has every method and task at least once."""
    common = dict(threads=threads, device=device)
    pre = out / "pretrain"
    jobs = [
        pretrain_task(out, "pretrain/kind", preset, kind=True, seed=0, **common),
        pretrain_task(out, "pretrain/dense", preset, kind=False, seed=0, **common),
        deploy_task(out, "deploy", pre / "kind", ("pretrain/kind",), **common),
    ]
    for seed in preset.seeds:
        for task in TASKS:
            for method in preset.methods:
                deps = ("deploy",) if get(method).is_kind else ("deploy", "pretrain/dense")
                jobs.append(
                    transfer_task(
                        out,
                        f"transfer/{task}/{method}/seed{seed}",
                        preset,
                        deps,
                        task=task,
                        method=method,
                        seed=seed,
                        parts=str(out / "deploy" / "parts"),
                        dense=str(pre / "dense"),
                        **common,
                    )  # fmt: skip
                )
    return jobs


def run_demo(
    out: str | Path,
    preset: str | Preset = "default",
    jobs: int | None = None,
    device: str = "auto",
    methods: tuple[str, ...] | None = None,
    report_only: bool = False,
) -> Path:
    """Run (or continue) the demo into `out` with a named preset (or a custom `Preset`); returns
    the path of report.md. `report_only` writes the report from the jobs finished so far."""
    out = Path(out)
    preset_name = preset if isinstance(preset, str) else "custom"
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    if methods:
        preset = replace(preset, methods=tuple(methods))
    for method in preset.methods:
        get(method)  # an unknown name fails here, before any job starts
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    workers = jobs or (1 if device == "cuda" else max(1, min(4, os.cpu_count() or 1)))
    threads = max(1, (os.cpu_count() or 1) // workers) if device == "cpu" else 1
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "preset": preset_name,
        **asdict(preset),
        "jobs": workers,
        "threads_per_job": threads,
        "device": device,
    }
    saved = out / "settings.json"
    if saved.is_file() and json.loads(saved.read_text())["preset"] != preset_name:
        raise ValueError(f"{out} holds a demo with another preset; choose another --out")
    saved.write_text(json.dumps(settings, indent=2))

    t0 = time.time()
    results, failed = execute(plan(out, preset, threads, device), out, workers, report_only)
    wall = None if report_only else time.time() - t0
    report = write_report(out, settings, results, failed, wall_seconds=wall)
    if failed:
        log.error("%d job(s) failed; see %s and the job logs beside the runs", len(failed), report)
    return report
