"""`kind-dit demo`: every stage of KIND on the bundled data, against the methods people would use
instead, in one command.

1. pre-train a KIND DiT and a dense DiT of the same size on mnist:0-5;
2. decompose KIND; assemble it for one, two and all classes; check that the assembled and merged
   models compute the full model's outputs; measure their sizes;
3. transfer to novel classes (mnist:6-9) and across a domain shift (animal silhouettes) with KIND
   and the baselines at KIND's budget of trainable parameters;
4. evaluate every model on the test split (FID, precision, recall and class accuracy in the feature
   space of a classifier trained on that dataset), also along training for FID-against-steps curves;
5. where the preset asks (the paper preset): KIND-ify the dense DiT and compare it with KIND from
   scratch at equal total steps, and draw FID against size for KIND truncation against the dense
   DiT truncated by its SVD (`extras`);
6. write report.md with the tables, sample grids and plots.

Independent jobs run side by side in worker processes (one CPU thread each by default, which is
what a 2-core laptop runs best); each job writes its result when it finishes, and re-running the
demo with the same --out skips finished jobs, so an interrupted demo continues.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from kind.core.device import pick_device
from kind.experiments.jobs import deploy_task, pretrain_task, size_task, transfer_task
from kind.experiments.presets import PRESETS, SOURCES, Preset, saved_preset
from kind.experiments.report import write_report
from kind.experiments.results import RunResult
from kind.experiments.scheduler import Job, execute, result_path
from kind.io import read_json, write_json
from kind.transfer.registry import check_budget, get


def plan(out: Path, preset: Preset, threads: int, device: str) -> list[Job]:
    """Per source: pre-training (KIND and dense) and deployment; then the transfers, first seed
    first (every method, task and source once), then the budget curves, then the other seeds,
    so an interrupted run already holds the whole picture at one seed."""
    common = dict(threads=threads, device=device)
    jobs = []
    for src in (SOURCES[s] for s in preset.sources):
        pre = out / src.prefix / "pretrain"
        jobs += [
            pretrain_task(out, f"{src.prefix}pretrain/kind", preset, kind=True, seed=0,
                          source=src.name, **common),
            pretrain_task(out, f"{src.prefix}pretrain/dense", preset, kind=False, seed=0,
                          source=src.name, **common),
            deploy_task(out, f"{src.prefix}deploy", pre / "kind", (f"{src.prefix}pretrain/kind",),
                        **common),
        ]  # fmt: skip

    def transfers(seed: int, method: str, scale: float = 1.0) -> list[Job]:
        kind = get(method).is_kind
        # the null-tailor variant at KIND's budget (the budget curves vary the tailor rank alone)
        nulls = (False, True) if method in preset.null_methods and scale == 1 else (False,)
        out_jobs = []
        for src in (SOURCES[s] for s in preset.sources):
            deps = (f"{src.prefix}deploy",) + (() if kind else (f"{src.prefix}pretrain/dense",))
            for task in src.tasks:
                for null in nulls:
                    variant = (
                        method + ("+null" if null else "") + ("" if scale == 1 else f"@x{scale:g}")
                    )
                    out_jobs.append(
                        transfer_task(
                            out,
                            f"{src.prefix}transfer/{task.name}/{variant}/seed{seed}",
                            preset,
                            deps,
                            task=task.name,
                            method=method,
                            seed=seed,
                            parts=str(out / src.prefix / "deploy" / "parts"),
                            dense=str(out / src.prefix / "pretrain" / "dense"),
                            source=src.name,
                            budget_scale=scale,
                            null_tailor=null,
                            **common,
                        )  # fmt: skip
                    )
        return out_jobs

    seeded = preset.methods if preset.seeded_methods is None else preset.seeded_methods
    first, *others = preset.seeds
    for method in preset.methods:
        jobs += transfers(first, method)
    for scale in preset.budget_scales:
        for method in preset.budget_methods:
            jobs += transfers(first, method, scale)
    for seed in others:
        for method in preset.methods:
            if method in seeded:
                jobs += transfers(seed, method)
    return jobs + extras(out, preset, common)


def extras(out: Path, preset: Preset, common: dict) -> list[Job]:
    """The comparisons added to the claims: KIND-ify against KIND from scratch at equal total
    steps on the first source (each pre-training deployed and transferred to the source's tasks
    with KIND, first seed), and FID against size for every source.

    The scratch side is the source's KIND pre-training continued from its last checkpoint to
    pretrain_steps + kindify_steps: with a constant learning rate after warm-up and exact resumes,
    that is the run from scratch, its first pretrain_steps not redone."""
    jobs = []
    if preset.kindify_steps:
        src = SOURCES[preset.sources[0]]
        pre = out / src.prefix / "pretrain"
        for arm, steps, deps, start in (
            ("kindify", preset.kindify_steps, "pretrain/dense", {"init_from": str(pre / "dense")}),
            ("scratch", preset.pretrain_steps + preset.kindify_steps, "pretrain/kind",
             {"continue_from": str(pre / "kind")}),
        ):  # fmt: skip
            p = f"{src.prefix}{arm}/"
            jobs += [
                pretrain_task(out, f"{p}pretrain/kind", preset, (f"{src.prefix}{deps}",),
                              kind=True, seed=0, source=src.name, steps=steps, pretraining=arm,
                              **start, **common),
                deploy_task(out, f"{p}deploy", out / p / "pretrain" / "kind",
                            (f"{p}pretrain/kind",), **common),
            ] + [
                transfer_task(out, f"{p}transfer/{task.name}/kind/seed{preset.seeds[0]}", preset,
                              (f"{p}deploy",), task=task.name, method="kind",
                              seed=preset.seeds[0], parts=str(out / p / "deploy" / "parts"),
                              dense=str(pre / "dense"), source=src.name, pretraining=arm, **common)
                for task in src.tasks
            ]  # fmt: skip
    if preset.size_fractions:
        for src in (SOURCES[s] for s in preset.sources):
            jobs.append(
                size_task(out, f"{src.prefix}sizes", preset,
                          (f"{src.prefix}deploy", f"{src.prefix}pretrain/dense"),
                          source=src.name, parts=str(out / src.prefix / "deploy" / "parts"),
                          dense=str(out / src.prefix / "pretrain" / "dense"), **common)
            )  # fmt: skip
    return jobs


SETTINGS = "settings.json"
# what kind-dit writes into a demo's settings.json besides the preset's fields
_RECORDED = ("preset", "jobs", "threads_per_job", "device", "size", "lr", "pretrain_steps")
# preset fields that may grow when a demo is continued: more of them adds jobs beside the
# finished ones (more seeds or methods) without changing what those ran
_ADDS_JOBS = ("sources", "methods", "seeds", "seeded_methods", "null_methods", "budget_scales",
              "budget_methods")  # fmt: skip
# comparisons one job runs whole: they may be turned on, not grown (the finished job would not
# run the new fractions, and the report would not say so)
_TURNS_ON = ("size_fractions", "kindify_steps")


def saved_settings(out: Path) -> dict | None:
    """The settings of the demo in `out`; None for a new or empty folder. A folder that holds
    anything else is a user's and is refused: its settings.json must be one a demo wrote."""
    if not out.exists():
        return None
    if out.is_dir() and not any(out.iterdir()):
        return None
    try:
        settings = read_json(out / SETTINGS) if (out / SETTINGS).is_file() else {}
    except ValueError:
        settings = {}
    if not all(k in settings for k in _RECORDED):
        raise ValueError(
            f"{out} holds files that are not a kind-dit demo; choose a new or empty --out "
            "(nothing was touched)"
        )
    return settings


def _changed(saved: dict, preset_name: str, asked: dict) -> list[str]:
    """How the asked preset differs from the one a demo ran with, field by field, leaving out
    what only adds jobs (`_ADDS_JOBS`) and fields this version added since (absent from the
    saved settings): a continued demo must not mix jobs of two settings in one report."""
    changed = []
    if preset_name != "custom" and saved["preset"] != preset_name:  # custom: by its fields
        changed.append(f"preset {saved['preset']} (asked: {preset_name})")
    for key, value in asked.items():
        old = saved.get(key, value)
        grows = (key in _TURNS_ON and not old) or (key in _ADDS_JOBS and (
            not old or (isinstance(old, list) and isinstance(value, list)
                        and all(v in value for v in old))
        ))  # fmt: skip
        if old != value and not grows:
            changed.append(f"{key} {old} (asked: {value})")
    return changed


class DemoError(RuntimeError):
    """Jobs of the demo failed; the report of those that finished was written."""


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
    if methods is not None:
        if not methods:
            raise ValueError("methods names no method; pass None for the preset's")
        preset = replace(preset, methods=tuple(methods))
    for method in preset.methods + preset.budget_methods + preset.null_methods:
        get(method)  # an unknown name fails here, before any job starts
    for method in preset.null_methods:  # (one not in `methods` has no run to vary)
        if not get(method).is_kind:
            raise ValueError(
                f"null_methods names {method!r}, a baseline: the null-tailor variant is of KIND "
                "methods (a baseline has no tailors; its transfer would fail after pre-training)"
            )
    if preset.budget_scales:  # a method no budget sizes would train its 1x model at every scale
        for method in preset.budget_methods:
            if not get(method).is_kind:
                check_budget(method, "budget_methods")
    if preset.noise_draws < 1:
        raise ValueError(f"noise_draws must be at least 1, not {preset.noise_draws}")
    for source in preset.sources:
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    device = str(pick_device(device))  # checked before any job starts: "auto" -> cuda:0 / cpu
    on_cpu = torch.device(device).type == "cpu"
    workers = jobs or (max(1, min(4, os.cpu_count() or 1)) if on_cpu else 1)
    threads = max(1, (os.cpu_count() or 1) // workers) if on_cpu else 1
    saved = saved_settings(out)
    asked = json.loads(json.dumps(asdict(preset)))  # tuples as the JSON lists saved
    if saved is not None:
        changed = _changed(saved, preset_name, asked)
        if changed and not report_only:
            raise ValueError(
                f"{out} holds a demo run with other settings ({'; '.join(changed)}): its jobs "
                "and the new ones would share one report; continue it with the settings it "
                "was started with, or choose another --out"
            )
    if report_only and saved is not None:  # run nothing: report the jobs as they ran
        settings, preset = asked | saved, saved_preset(saved)
    else:
        settings = {"preset": preset_name, **asked, "jobs": workers, "threads_per_job": threads,
                    "device": device}  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / SETTINGS, settings)

    jobs_planned = plan(out, preset, threads, device)
    to_run = [j for j in jobs_planned if not result_path(out, j.name).is_file()]
    t0 = time.time()
    results, failed = execute(jobs_planned, out, workers, report_only)
    results = {
        n: r.moved_to(out / n) if isinstance(r, RunResult) else r for n, r in results.items()
    }
    # One wall time per invocation that ran jobs, kept beside the results: an invocation that
    # only continues a finished demo (or writes the report) leaves the earlier figures standing.
    walls_file = out / "wall_times.json"
    walls = read_json(walls_file, "seconds")["seconds"] if walls_file.is_file() else []
    if to_run and not report_only:
        walls.append(time.time() - t0)
        write_json(walls_file, {"seconds": walls})
    report = write_report(out, settings, results, failed, invocation_seconds=walls)
    if failed:
        first = next(iter(failed.items()))
        raise DemoError(
            f"{len(failed)} job(s) failed (first: {first[0]}: {first[1]}); the report of the "
            f"jobs that finished is {report}, the job logs are beside the runs"
        )
    return report
